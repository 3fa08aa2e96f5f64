"""How much a delivery worker claims per round and hands a sender per group, from
the pace of its last round (engine/delivery.py round_size, group_size)."""

from mfconsole.engine.delivery import BATCH, BATCH_MAX, GROUP_S, ROUND_S, group_size, round_size


def test_a_round_is_about_round_s_of_sending_within_its_bounds():
    assert round_size(0.0, 1) == BATCH                       # first round: pace not known
    assert round_size(5.0, 1) == BATCH                       # a slow peer: never below
    assert round_size(100 / ROUND_S, 1) == 100               # a fast one: its pace
    assert round_size(1e6, 1) == BATCH_MAX                   # never above
    assert round_size(5.0, 500) == 500                       # one full STOW request at least


def test_a_group_is_cut_to_the_peer_pace_only_for_senders_that_allow_it():
    assert group_size(0.0, 8, 32) == 8                       # first round: pace not known
    assert group_size(1.0, 8, 32) == 8                       # a peer taking a second each
    assert group_size(20 / GROUP_S, 8, 32) == 20
    assert group_size(1e6, 8, 32) == 32
    # A sender that does not say min_group (STOW: the user's request size) is not cut.
    assert group_size(1.0, 100, 100) == 100
    assert group_size(0.0, 1, 1) == 1                        # one object per request (MLLP)
