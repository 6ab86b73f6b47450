"""`--gpus-per-node auto` (the default): the GPUs each node has, CPU only when none has any, and the
console says which and why."""

from __future__ import annotations

import pytest

from acestep_dist.errors import UserError
from acestep_dist.train.gpus import choose_gpus_per_node, parse_gpus_per_node


def _never():
    raise AssertionError("the GPUs were counted although the choice did not need them")


def test_a_given_count_is_kept_and_nothing_is_counted():
    assert choose_gpus_per_node("4", 2, None, _never) == (4, "4 GPU worker(s) per node, as asked")
    assert choose_gpus_per_node(0, 1, None, _never) == (0, "on CPU, as asked")
    assert choose_gpus_per_node("auto", 1, 3, _never) == (0, "on CPU: --workers asks for CPU workers")


def test_auto_takes_the_gpus_the_nodes_have():
    per_node, why = choose_gpus_per_node("auto", 1, None, lambda: ([8.0], "this machine"))
    assert per_node == 8 and "the GPUs of this machine" in why
    # the head (no GPU) is not a training node; two of three GPU nodes, the fewest GPUs of the two
    per_node, why = choose_gpus_per_node("AUTO", 2, None, lambda: ([0.0, 8.0, 4.0, 8.0], "the cluster's live nodes"))
    assert per_node == 8 and "2 node(s)" in why
    per_node, why = choose_gpus_per_node("auto", 3, None, lambda: ([0.0, 8.0, 4.0, 8.0], "the cluster's live nodes"))
    assert per_node == 4 and "the fewest of the 3 nodes' 8, 8, 4" in why


def test_auto_trains_on_cpu_without_gpus_and_says_so():
    per_node, why = choose_gpus_per_node("auto", 2, None, lambda: ([0.0, 0.0], "the cluster's live nodes"))
    assert per_node == 0 and why.startswith("on CPU: no GPU on the cluster's live nodes") and "--gpus-per-node N" in why


def test_too_few_gpu_nodes_is_an_error_not_a_silent_cpu_run():
    with pytest.raises(UserError, match="--nodes 3: the cluster's live nodes has 2 node"):
        choose_gpus_per_node("auto", 3, None, lambda: ([0.0, 1.0, 1.0], "the cluster's live nodes"))


@pytest.mark.parametrize("bad", ["-1", "two", "1.5", ""])
def test_bad_values_are_refused(bad):
    with pytest.raises(UserError, match="--gpus-per-node"):
        parse_gpus_per_node(bad)


def test_the_command_line_says_what_it_chose(tmp_path):
    """On this machine (no GPU) the default is a CPU run, said on the console before anything else."""
    from click.testing import CliRunner

    from acestep_dist.cli import cli

    result = CliRunner().invoke(cli, ["train", "--data", str(tmp_path / "none"), "--model", str(tmp_path / "none"),
                                      "--output", str(tmp_path / "run")])
    assert result.output.splitlines()[0] == ("train: on CPU: no GPU on this machine (give --gpus-per-node N if GPU "
                                             "nodes are still to start, e.g. on an autoscaling cluster)")
    assert result.exit_code == 1
    bad = CliRunner().invoke(cli, ["train", "--data", "d", "--model", "m", "--output", "o", "--gpus-per-node", "x"])
    assert bad.exit_code == 1 and "--gpus-per-node 'x'" in bad.output
