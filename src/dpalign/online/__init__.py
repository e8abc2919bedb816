"""Online alignment: sampling answers from the policy (``generate``), judging them
(``judge``), annotation-free rejected answers (``bdhs``) and the online / mixed pair
source of the DP step (``source``)."""
