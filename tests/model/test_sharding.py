"""Shard-aware fitting in one process: the parts that need no process group.

The two-rank runs (fitted state and metrics equal to one process, the train set never
gathered, a bank split across ranks, unequal batch counts, a rank failing between two
all-reduces) are in ``tests/model/test_distributed.py``.
"""

from __future__ import annotations

import pytest
import torch
from helpers import SmallNet

import wrapcal
from wrapcal import distributed
from wrapcal.export.checks import check_exportable
from wrapcal.features.extract import FeatureSet


def _data(n: int = 300, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=generator), torch.arange(n) % 10


def test_a_whole_feature_set_combines_over_shards_as_itself():
    features = torch.randn(7, 4)
    whole = FeatureSet("train", features, torch.arange(7) % 2)
    assert not whole.sharded and whole.total == 7 and whole.offset == 0
    values = torch.tensor([1.5, -2.0])
    for combine in (whole.sum_over_shards, whole.min_over_shards, whole.max_over_shards):
        assert combine(values) is values
    assert whole.cat_over_shards(features) is features


def test_lockstep_and_exchange_outside_a_process_group_pass_items_through():
    assert list(distributed.lockstep(iter([1, 2, 3]))) == [1, 2, 3]
    assert distributed.exchange({"a": 1}) == [{"a": 1}]
    tensor = torch.arange(3.0)
    assert distributed.all_reduce(tensor) is tensor


def test_shard_bank_changes_nothing_in_one_process():
    torch.manual_seed(0)
    net = SmallNet()
    train = _data(300, 1)
    plain = wrapcal.wrap(net, [("knn", {"k": 5, "bank_size": 200})]).fit(train, progress=False)
    sharded = wrapcal.wrap(net, [("knn", {"k": 5, "bank_size": 200, "shard_bank": True})])
    sharded.fit(train, progress=False)
    a, b = plain.get_plugin("knn"), sharded.get_plugin("knn")
    assert torch.equal(a.bank_, b.bank_) and a.bank_.shape[0] == 200
    assert not wrapcal.get_tags(b).collective_outputs
    x = _data(20, 2)[0]
    assert torch.equal(plain.predict(x).scores["knn"], sharded.predict(x).scores["knn"])


def test_a_bank_split_across_ranks_is_refused_outside_its_process_group(tmp_path):
    # What a model fitted with shard_bank=True under torchrun holds on one rank, here
    # outside any process group (after destroy_process_group, say).
    torch.manual_seed(0)
    wrapped = wrapcal.wrap(SmallNet(), [("knn", {"k": 5, "shard_bank": True})])
    wrapped.fit(_data(), progress=False)
    knn = wrapped.get_plugin("knn")
    knn._bank_ranks = 2
    assert wrapcal.get_tags(knn).collective_outputs
    fix = r"call wrapcal\.distributed\.unshard\(wrapped\) on every rank first"
    with pytest.raises(distributed.DistributedError, match=r"cannot save .*plugin knn.*" + fix):
        wrapped.save(tmp_path / "model.wrapcal")
    assert not (tmp_path / "model.wrapcal").exists()
    with pytest.raises(distributed.DistributedError, match=r"cannot export .*" + fix):
        check_exportable(wrapped)
    with pytest.raises(distributed.DistributedError, match=r"split over 2 ranks .* sees 1"):
        wrapped.predict(_data(4)[0])


class _Recording(wrapcal.Plugin):
    """A plugin that says whether its state is sharded and records ``unshard`` calls."""

    def __init__(self, label: str = "", sharded: bool = False, calls: list | None = None):
        super().__init__()
        self.label, self.sharded, self.calls = label, sharded, calls

    def __wrapcal_tags__(self) -> wrapcal.PluginTags:
        tags = super().__wrapcal_tags__()
        tags.stage = wrapcal.Stage.DETECT
        tags.requires_fit = False
        tags.collective_outputs = self.sharded
        return tags

    def unshard(self) -> None:
        assert self.calls is not None
        self.calls.append(self.label)


def test_unshard_calls_the_declared_method_of_every_sharded_plugin_in_chain_order():
    calls: list[str] = []
    # One class each: a model holds one plugin per name (the class name here).
    plugins = [
        type(f"Recording_{label}", (_Recording,), {})(label, sharded=sharded, calls=calls)
        for label, sharded in (("first", True), ("whole", False), ("second", True))
    ]
    split = wrapcal.Split(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    wrapped = wrapcal.wrap(None, plugins, split=split)
    assert sorted(distributed.sharded_plugins(wrapped)) == sorted(
        name
        for name, p in zip(wrapped.plugin_names, wrapped.plugins, strict=True)
        if p.sharded  # type: ignore[attr-defined]
    )
    assert distributed.unshard(wrapped) is wrapped
    order = [p.label for p in wrapped.plugins if p.sharded]  # type: ignore[attr-defined]
    assert calls == order and len(calls) == 2  # never the plugin with whole state
    # The declared default is a no-op: a plugin without sharded state need not define it.
    assert wrapcal.Plugin.unshard(plugins[1]) is None


# --- what the ranks compare before a fit (the exchange itself: test_distributed.py) ------


def _differing(a: dict, b: dict) -> list[str]:
    return [topic for topic in {**a, **b} if a.get(topic, (None,))[0] != b.get(topic, (None,))[0]]


def test_agreement_facts_match_for_the_same_model_and_name_only_what_differs():
    def model(**params):
        torch.manual_seed(0)
        return wrapcal.wrap(SmallNet(), ["temperature", ("conformal", {"alpha": 0.1, **params})])

    same = distributed.model_facts(model())
    assert _differing(same, distributed.model_facts(model())) == []
    nudged = model()
    with torch.no_grad():
        nudged.backbone.model.conv.weight.view(-1)[0] += 1e-6
    assert _differing(same, distributed.model_facts(nudged)) == ["the backbone's weights"]
    assert _differing(same, distributed.model_facts(model(alpha=0.2))) == [
        "plugin conformal's parameter alpha",
        "plugin conformal's learned state",  # its repr shows its parameters
    ]
    fitted = model()
    with torch.no_grad():
        fitted.get_plugin("temperature").temperature.fill_(2.0)
    assert _differing(same, distributed.model_facts(fitted)) == [
        "plugin temperature's learned state"
    ]
    # A bare classifier (evaluate's baseline): its architecture and weights.
    torch.manual_seed(0)
    bare = distributed.model_facts(SmallNet(), "model 'baseline'")
    assert list(bare) == [
        "model 'baseline': the model's architecture",
        "model 'baseline': the model's weights",
    ]


def test_agreement_facts_of_data_see_the_data_not_its_container():
    x, y = _data(200)
    facts = distributed.data_facts("calibration", (x, y))
    # numpy and int32 labels on one rank, torch and int64 on another: the same data.
    assert _differing(facts, distributed.data_facts("calibration", (x.numpy(), y.int()))) == []
    assert facts["the calibration set's labels"][0].startswith("200 labels, 10 classes (0..9)")
    assert facts["the size of the calibration set"][0] == "200 rows"
    assert _differing(facts, distributed.data_facts("calibration", (x, y.flip(0)))) == [
        "the calibration set's labels"
    ]
    assert _differing(facts, distributed.data_facts("calibration", (x + 1e-6, y))) == [
        "a sample of the calibration set's inputs"
    ]
    # A torchvision-style dataset: its targets and class names, without reading it.
    dataset = torch.utils.data.TensorDataset(x, y)
    dataset.targets, dataset.classes = y.tolist(), [f"c{i}" for i in range(10)]  # type: ignore[attr-defined]
    described = distributed.data_facts("train", dataset)
    assert described["the train set's labels"][0] == facts["the calibration set's labels"][0]
    assert described["the train set's class names"][0].startswith("10 (c0, c1, c2, ...), digest ")


def test_parameters_compare_alike_in_every_process():
    # A set's order and an object's address change from one process to the next.
    def f() -> None: ...

    assert (
        distributed._canonical({"b": {"y", "x", "z"}, "a": 1})
        == '{"a":1,"b":["\'x\'","\'y\'","\'z\'"]}'
    )
    assert " at 0x" not in distributed._canonical(
        {"fn": f}
    ) and "function" in distributed._canonical({"fn": f})
    assert distributed._canonical({(1, 2): 3}) == "{(1, 2): 3}"  # keys JSON cannot write
    t = distributed._canonical(torch.arange(3))
    assert t == distributed._canonical(torch.arange(3).numpy()) and '"shape":[3]' in t


def test_messages_group_the_ranks_by_value():
    values = ["a", "a", "a", "b", "c", "a"]
    assert distributed._by_rank(values) == "ranks 0-2, 5 = a; rank 3 = b; rank 4 = c"
    many = distributed._by_rank([str(i) for i in range(7)])
    assert many.endswith("rank 3 = 3; and 3 other values")
    assert (
        distributed._shown("x" * 200).endswith("...") and len(distributed._shown("x" * 200)) == 72
    )


def test_agreement_outside_a_process_group_checks_nothing():
    distributed.check_agreement({"anything": ("value", "fix")})
    assert distributed.check_shard_rows("train", torch.zeros(10), 7, False) == [7]
    distributed.agree_to_evaluate({"m": SmallNet()}, {"test": _data(10)}, {"n_bins": 15})


def test_data_the_user_shards_is_recognised():
    x, y = _data(20)
    dataset = torch.utils.data.TensorDataset(x, y)
    sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=2, rank=0)
    assert distributed.sharded_by_user(torch.utils.data.DataLoader(dataset, sampler=sampler))
    assert not distributed.sharded_by_user(torch.utils.data.DataLoader(dataset))

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            yield from zip(x, y, strict=True)

    assert distributed.sharded_by_user(Stream())
    assert distributed.sharded_by_user(torch.utils.data.DataLoader(Stream()))
    assert not distributed.sharded_by_user((x, y)) and not distributed.sharded_by_user(dataset)
    facts = distributed.data_facts("train", torch.utils.data.DataLoader(Stream()))
    assert facts["how the train set is sharded"][0] == "by the user"
    assert facts["the size of the train set"][0] == "unknown"
    # A sampler built for rank 0 of 2, outside any process group (rank 0 of 1): named.
    facts = distributed.data_facts("train", torch.utils.data.DataLoader(dataset, sampler=sampler))
    assert facts["the train set's DistributedSampler"][0] == (
        "num_replicas=2, rank=0 in the process of rank 0 of 1"
    )


def test_a_bank_split_across_ranks_is_compared_as_split():
    # Each rank holds its own part of a sharded bank: evaluate's check must not refuse it.
    torch.manual_seed(0)
    wrapped = wrapcal.wrap(SmallNet(), [("knn", {"k": 5, "shard_bank": True})])
    wrapped.fit(_data(), progress=False)
    wrapped.get_plugin("knn")._bank_ranks = 2
    facts = distributed.model_facts(wrapped)
    assert facts["plugin knn's learned state"][0] == "split across the ranks"
