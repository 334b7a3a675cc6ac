"""An eval over a two-node Ray cluster (ray.cluster_utils.Cluster: two raylets on this machine, as two
machines would run them after `ray start --head` and `ray start --address`): one engine actor per node,
joined by address, records what one process does."""

import json

import pytest

from qwen2.cli import main

pytest.importorskip("ray", reason="the `ray` extra is not installed (pip install -e '.[ray]')")


@pytest.fixture
def two_nodes():
    import ray
    from ray.cluster_utils import Cluster

    assert not ray.is_initialized(), "another test left its Ray instance running"
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_an_eval_on_two_nodes_puts_an_actor_on_each_and_records_what_one_process_does(two_nodes, tiny_hf, tmp_path,
                                                                                       capsys):
    common = ["eval", "asdiv", "--max-tokens", "4", "--limit", "4", "--model", str(tiny_hf), "--quant", "none",
              "--dtype", "float32"]
    main([*common, "--json", str(tmp_path / "here.json")])
    capsys.readouterr()
    main([*common, "--json", str(tmp_path / "nodes.json"), "--ray", two_nodes.address])
    said = capsys.readouterr().out
    assert "2 engine actors on 2 Ray nodes" in said, said  # by default one per node, each on its own
    here, spread = (json.loads((tmp_path / name).read_text()) for name in ("here.json", "nodes.json"))
    assert spread["results"] == here["results"] and len(here["results"]) == 4
    assert spread["summary"] == here["summary"]


def test_an_address_nothing_answers_on_is_one_line_at_once(capsys, tmp_path):
    import ray

    assert not ray.is_initialized()
    with pytest.raises(SystemExit) as exit_:
        main(["data", "instruct-feedback", "--out", str(tmp_path / "out"), "--ray", "127.0.0.1:1"])
    error = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 1 and len(error) == 1 and "nothing answers at 127.0.0.1:1" in error[0], error
