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
