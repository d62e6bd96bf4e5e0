"""Repo ids the Hub would refuse are refused by `check_can_push`, before any calibration or network call."""
import pytest

from diffusers_timetuner.hub import check_can_push


@pytest.mark.parametrize("repo_id", ["org/..", "org/name\n", "org/" + "a" * 200, "org/-name"])
def test_repo_ids_the_hub_refuses_fail_before_calibration(repo_id):
    # Each of these matched the 'ORG/NAME' pattern alone and failed only at upload time.
    with pytest.raises(ValueError, match="not a valid Hub repo id"):
        check_can_push(repo_id, token="x")


def test_a_valid_repo_id_passes_with_a_token():
    assert check_can_push("org/name.v2_x", token="x") == "x"
