"""Trust: a saved file cannot steer ``load``, corruption is detected, no input is silently
wrong, and the user's model and files are never changed (issue: trust)."""

from __future__ import annotations

import copy
import json
import os
import random
import stat
from pathlib import Path

import pytest
import timm
import torch
from helpers import SmallNet, SoftmaxNet
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save as save_tensors
from torch import nn

import wrapcal
from wrapcal.errors import DataError, SavedFileError
from wrapcal.files import format as saving
from wrapcal.files.cifar_resnets import cifar_resnet20
from wrapcal.logits.temperature import fit_temperature
from wrapcal.metrics import baseline_scores, ece, softmax_probs


def batch(n: int = 8, side: int = 8, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, side, side, generator=torch.Generator().manual_seed(seed))


def labelled(model: nn.Module, n: int = 120, side: int = 8, seed: int = 0):
    """Inputs and labels the model gets right two times in three."""
    x = batch(n, side, seed)
    with torch.no_grad():
        y = model.eval()(x).argmax(-1)
    y[::3] = (y[::3] + 1) % y.max().clamp_min(1)
    return x, y


def rewrite(path: Path, out: Path, mutate) -> Path:
    """What an attacker does: edit the configuration and recompute the digest."""
    stored = saving.read(path)
    config = copy.deepcopy(stored.config)
    replaced = mutate(config)  # edits in place; a list replaces the whole document
    config = replaced if isinstance(replaced, list) else config
    if isinstance(config, dict):
        body = {k: v for k, v in config.items() if k != "digest"}
        config = {**body, "digest": saving.digest(body, stored.tensors)}
    out.write_bytes(save_tensors(stored.tensors, metadata={"wrapcal": json.dumps(config)}))
    return out


@pytest.fixture(scope="module")
def saved_timm(tmp_path_factory) -> tuple[Path, torch.Tensor]:
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=4).eval()
    x, y = labelled(model, side=32)
    wrapped = wrapcal.wrap(model, ["temperature"]).fit(calibration=(x, y), progress=False)
    path = wrapped.save(tmp_path_factory.mktemp("timm") / "m.wrapcal")
    with torch.no_grad():
        return path, wrapped(x[:8])


# --- load rebuilds only what it can vouch for ------------------------------------------


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c["model"]["kwargs"].update(checkpoint_path="/etc/passwd"), "not allowed"),
        (lambda c: c["model"]["kwargs"].update(pretrained=True), "not allowed"),
        (lambda c: c["model"].update(name="hf-hub:timm/resnet18.a1_in1k"), "not a plain name"),
        (lambda c: c["model"].update(name="local-dir:/tmp/model"), "not a plain name"),
        (lambda c: c["model"].update(name="../../etc/passwd"), "not a plain name"),
        (lambda c: c["model"].update(name="resnet_that_does_not_exist"), "unknown timm model"),
        (lambda c: c["model"].update(library="importlib"), "unknown model family"),
        (lambda c: c["model"]["kwargs"].update(num_classes=True), "asks for True classes"),
        (lambda c: c["model"]["kwargs"].update(drop_rate=float("nan")), "drop_rate"),
        # timm itself refuses this tag with pretrained=False, in a RuntimeError
        (lambda c: c["model"].update(name="resnet10t.a1_in1k"), "pretrained tag.*'resnet10t'"),
        (lambda c: c["model"].update(name="resnet10t.tv_in1k"), "pretrained tag"),
    ],
)
def test_a_crafted_model_description_is_refused(saved_timm, tmp_path, monkeypatch, edit, message):
    def no_file_access(*args, **kwargs):
        raise AssertionError("load must not read a file the header names")

    monkeypatch.setattr(torch, "load", no_file_access)
    crafted = rewrite(saved_timm[0], tmp_path / "crafted.wrapcal", edit)
    with pytest.raises(SavedFileError, match=message):
        wrapcal.load(crafted)


def _peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def test_sizes_in_the_header_are_checked_before_anything_is_built(saved_timm, tmp_path):
    """10**7 classes in a small file: refused before 20 GB of head weights exist."""

    def huge(config):
        config["num_classes"] = 10**7
        config["model"]["kwargs"]["num_classes"] = 10**7

    before = _peak_rss_mb()
    with pytest.raises(SavedFileError, match=r"10000000 classes.*stored weight is \(4, 512\)"):
        wrapcal.load(rewrite(saved_timm[0], tmp_path / "huge.wrapcal", huge))
    only_kwargs = rewrite(
        saved_timm[0], tmp_path / "kw.wrapcal", lambda c: c["model"]["kwargs"].update(num_classes=9)
    )
    with pytest.raises(SavedFileError, match="asks for 9 classes"):
        wrapcal.load(only_kwargs)
    assert _peak_rss_mb() - before < 500


def test_a_size_argument_that_does_not_match_the_tensors_is_refused_on_the_meta_device(tmp_path):
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=3, img_size=32)
    wrapped = wrapcal.wrap(vit)
    path = wrapped.save(tmp_path / "vit.wrapcal")
    loaded = wrapcal.load(path)  # rebuilt at its own size (img_size is saved)
    assert loaded.input_shape == (3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(batch(2, 32)), wrapped(batch(2, 32)))
    before = _peak_rss_mb()
    big = rewrite(
        path, tmp_path / "big.wrapcal", lambda c: c["model"]["kwargs"].update(img_size=8192)
    )
    with pytest.raises(SavedFileError, match="does not match the model.*pos_embed"):
        wrapcal.load(big)
    assert _peak_rss_mb() - before < 500


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c["plugins"][0]["params"].update(max_iter=-1), r"max_iter=-1 is invalid"),
        (lambda c: c["plugins"][0]["params"].update(maxiter=5), "no parameter 'maxiter'"),
        (lambda c: c["plugins"][0]["state"].update(fitted="yes"), "fitted"),
        (lambda c: c["plugins"][0]["state"].update(extra=1), "unknown learned values"),
        (lambda c: c["plugins"][0].update(name="no_such_plugin"), "not installed"),
        (lambda c: c.update(plugins="temperature"), "'plugins' is missing or not a list"),
        (lambda c: c.update(num_classes=None), "'num_classes' is missing"),
        (lambda c: c.pop("split"), "'split' is missing"),
        (lambda c: [c], "configuration is not an object"),
        (lambda c: c.clear(), "no format version"),
        (lambda c: c.update(wrapcal_version=3), "the wrapcal version is not a string"),
        (lambda c: c["plugins"][0].update(package=["wrapcal"]), "not {name, package, params"),
        # A package names where to look, never what to import: only installed ones count.
        (
            lambda c: c["plugins"][0].update(package="os"),
            "comes from the package os, which is not installed or does not register",
        ),
    ],
)
def test_nothing_in_the_header_is_trusted(saved_timm, tmp_path, edit, message):
    crafted = rewrite(saved_timm[0], tmp_path / "crafted.wrapcal", edit)
    with pytest.raises(SavedFileError, match=message):
        wrapcal.load(crafted)


def test_learned_plain_values_are_checked_as_fit_would_set_them(tmp_path):
    path = wrapcal.wrap(SmallNet().eval(), [("mc_dropout", {"p": 0.2})]).save(
        tmp_path / "m.wrapcal"
    )

    def certain_dropout(config):
        config["plugins"][0]["state"]["p_"] = 1.0  # would give NaN outputs

    with pytest.raises(SavedFileError, match=r"p_=1.0 is invalid; expected a number in \[0, 1\)"):
        wrapcal.load(rewrite(path, tmp_path / "p1.wrapcal", certain_dropout), model=SmallNet())


# --- save refuses what load refuses ------------------------------------------------------


def _corrupt_temperature(wrapped):
    wrapped.get_plugin("temperature").temperature.fill_(-1.0)


def _nan_temperature(wrapped):
    wrapped.get_plugin("temperature").temperature.fill_(float("nan"))


def _bad_parameter(wrapped):
    wrapped.get_plugin("temperature").max_iter = -1  # changed after wrap checked it


def _certain_dropout(wrapped):
    wrapped.get_plugin("mc_dropout").p_ = 1.0


def _misshapen_bank(wrapped):
    knn = wrapped.get_plugin("knn")
    knn.bank_ = torch.zeros(len(knn.bank_), knn.bank_.shape[1] + 1)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize(
    ("plugins", "corrupt", "message"),
    [
        (["temperature"], _corrupt_temperature, r"the temperature is -1.0; it must be > 0"),
        (["temperature"], _nan_temperature, r"learned tensor temperature holds NaN or inf values"),
        (["temperature"], _bad_parameter, r"parameter max_iter=-1 is invalid"),
        ([("mc_dropout", {"p": 0.2})], _certain_dropout, r"p_=1.0 is invalid; expected"),
        ([("knn", {"k": 3})], _misshapen_bank, r"plugins.0.bank_ is \(120, 17\) torch.float32"),
    ],
    ids=["out-of-range", "nan", "parameter", "plain-value", "tensor-shape"],
)
def test_save_refuses_what_load_refuses_with_loads_message(
    tmp_path, monkeypatch, plugins, corrupt, message
):
    """A plugin whose fit left a value load refuses cannot be saved into a file that then
    fails to load: save runs load's checks first, writes nothing, and says what load
    would say."""
    model = SmallNet().eval()
    x, y = labelled(model)
    wrapped = wrapcal.wrap(model, plugins).fit(train=(x, y), calibration=(x, y), progress=False)
    good = wrapped.save(tmp_path / "m.wrapcal")  # the fitted model saves and loads
    wrapcal.load(good, model=SmallNet())
    before = good.read_bytes()
    corrupt(wrapped)
    with pytest.raises(SavedFileError, match=message) as refused:
        wrapped.save(good)
    assert "wrapcal.load would refuse the file, so nothing was written" in str(refused.value)
    assert good.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["m.wrapcal"]
    # Written anyway (the check switched off), the file is refused by load, with the same words.
    monkeypatch.setattr(saving, "check_loadable", lambda *args: None)
    forced = wrapped.save(tmp_path / "forced.wrapcal")
    with pytest.raises(SavedFileError, match=message) as at_load:
        wrapcal.load(forced, model=SmallNet())
    said = str(at_load.value).removeprefix(f"{forced}: ")
    assert said.split(": ", 1)[-1] in str(refused.value)


def test_deeply_nested_json_is_a_saved_file_error(saved_timm, tmp_path):
    stored = saving.read(saved_timm[0])
    deep = '{"format": "wrapcal", "format_version": 2, "x": ' + "[" * 100_000 + "]" * 100_000 + "}"
    crafted = tmp_path / "deep.wrapcal"
    crafted.write_bytes(save_tensors(stored.tensors, metadata={"wrapcal": deep}))
    with pytest.raises(SavedFileError, match="nested too deeply|not valid JSON"):
        wrapcal.load(crafted)


# --- corruption is detected --------------------------------------------------------------


def test_every_single_bit_flip_in_the_tensors_is_detected(saved_timm, tmp_path):
    path, _ = saved_timm
    blob = path.read_bytes()
    start = 8 + int.from_bytes(blob[:8], "little")
    rng = random.Random(0)
    for i in range(25):
        offset = rng.randrange(start, len(blob))
        flipped = bytearray(blob)
        flipped[offset] ^= 1 << rng.randrange(8)
        broken = tmp_path / f"flip{i}.wrapcal"
        broken.write_bytes(bytes(flipped))
        with pytest.raises(SavedFileError, match="corrupt"):
            wrapcal.load(broken)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.data())
def test_fuzzed_headers_and_bytes_never_load_changed_outputs(saved_timm, tmp_path_factory, data):
    """Random byte flips anywhere and random JSON edits (digest not recomputed): load
    either refuses with a SavedFileError or gives exactly the saved outputs."""
    path, expected = saved_timm
    blob = bytearray(path.read_bytes())
    header_end = 8 + int.from_bytes(blob[:8], "little")
    if data.draw(st.booleans(), label="edit the JSON"):
        stored = saving.read(path)
        config = copy.deepcopy(stored.config)
        config["digest"] = json.loads(
            json.loads(bytes(blob[8:header_end]))["__metadata__"]["wrapcal"]
        )["digest"]
        keys = sorted(config)
        key = data.draw(st.sampled_from(keys), label="key")
        value = data.draw(
            st.one_of(st.none(), st.integers(-5, 10**9), st.text(max_size=5), st.floats()),
            label="value",
        )
        config[key] = value
        blob = bytearray(save_tensors(stored.tensors, metadata={"wrapcal": json.dumps(config)}))
    else:
        for _ in range(data.draw(st.integers(1, 4), label="flips")):
            offset = data.draw(st.integers(0, len(blob) - 1), label="offset")
            blob[offset] ^= 1 << data.draw(st.integers(0, 7), label="bit")
    broken = tmp_path_factory.mktemp("fuzz") / "m.wrapcal"
    broken.write_bytes(bytes(blob))
    try:
        loaded = wrapcal.load(broken)
    except SavedFileError:
        return
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=4).eval()
    x, _ = labelled(model, side=32)
    with torch.no_grad():
        assert torch.equal(loaded(x[:8]), expected)


def test_load_reads_the_file_once(saved_timm, monkeypatch):
    opened = []
    real_open = open

    def counting_open(file, *args, **kwargs):
        if str(file) == str(saved_timm[0]):
            opened.append(file)
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr("builtins.open", counting_open)
    monkeypatch.setattr("io.open", counting_open)
    wrapcal.load(saved_timm[0])
    assert len(opened) == 1


# --- round trips keep dtypes; the user's model and files are never changed -------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_round_trip_keeps_every_dtype_and_the_outputs(tmp_path, dtype):
    torch.manual_seed(0)
    model = cifar_resnet20(num_classes=4).to(dtype).eval()
    x, y = labelled(model.float(), side=32)
    model = model.to(dtype)
    wrapped = wrapcal.wrap(model, ["temperature"]).fit(calibration=(x.to(dtype), y), progress=False)
    loaded = wrapcal.load(wrapped.save(tmp_path / "m.wrapcal"))
    assert {t.dtype for t in loaded.state_dict().values() if t.is_floating_point()} == {
        t.dtype for t in wrapped.state_dict().values() if t.is_floating_point()
    }
    with torch.no_grad():
        assert torch.equal(loaded(x.to(dtype)), wrapped(x.to(dtype)))


def test_wrap_and_load_with_a_split_never_change_the_users_modules(tmp_path):
    model = SmallNet().eval()
    features = copy.deepcopy(model)
    features.out = nn.Identity()
    head = model.out
    before = copy.deepcopy(head.state_dict())
    x, y = labelled(model)
    split = wrapcal.Split(backbone=features, head=head)
    wrapped = wrapcal.wrap(None, [("label_smoothing", {"alpha": 0.05})], split=split)
    wrapped.fit(train=(x, y), progress=False)
    assert all(torch.equal(head.state_dict()[k], v) for k, v in before.items())
    assert not torch.equal(wrapped.head.weight, head.weight)  # the copy was retrained
    path = wrapped.save(tmp_path / "m.wrapcal")
    loaded = wrapcal.load(path, split=split)
    assert all(torch.equal(head.state_dict()[k], v) for k, v in before.items())
    assert torch.equal(loaded(x), wrapped(x))


def test_a_model_in_train_mode_is_wrapped_for_inference():
    """The README quickstart: timm gives a model in train mode."""
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=4)
    assert model.training
    wrapped = wrapcal.wrap(model)
    x = batch(16, 32)
    with torch.no_grad():
        assert torch.equal(wrapped(x), wrapped.predict(x).logits)
        assert torch.equal(wrapped(x), model.eval()(x))
        one = wrapped(x[:1])  # a single image works (eval-mode batch norm)
    assert torch.allclose(one, wrapped(x)[:1], atol=1e-5)
    # Fitting never updates the copy's batch-norm running statistics.
    fitted = wrapcal.wrap(model.train(), ["temperature"])
    bn = next(m for m in fitted.backbone.modules() if isinstance(m, nn.BatchNorm2d))
    stats = bn.running_mean.clone()
    fitted.fit(calibration=labelled(model, side=32), progress=False)
    assert torch.equal(bn.running_mean, stats)


def test_saved_files_keep_the_umask_and_the_previous_mode(tmp_path):
    wrapped = wrapcal.wrap(SmallNet().eval())
    old = os.umask(0o022)
    try:
        path = wrapped.save(tmp_path / "m.wrapcal")
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
        os.chmod(path, 0o640)
        wrapped.save(path)
        assert stat.S_IMODE(path.stat().st_mode) == 0o640
    finally:
        os.umask(old)
    # A save killed between write and rename left its temporary file: the next save of
    # the same name cleans it up (its process is gone), and leaves others' alone.
    stale = tmp_path / f".m.wrapcal.{2**22 + 12345}.deadbeef.wrapcal-tmp"
    stale.write_bytes(b"half a file")
    mine = tmp_path / f".m.wrapcal.{os.getpid()}.cafe.wrapcal-tmp"
    mine.write_bytes(b"in progress")
    wrapped.save(tmp_path / "m.wrapcal")
    assert not stale.exists() and mine.exists()


# --- inputs that gave silently wrong answers ----------------------------------------------


def test_probabilities_where_logits_are_expected_are_refused_or_handled():
    model = SoftmaxNet().eval()
    x, y = labelled(SmallNet().eval())
    with torch.no_grad():
        probs = model(x)
    for clipped in (probs, probs.clamp(1e-3, 1 - 1e-3), probs.clamp_min(1e-7)):
        with pytest.raises(DataError, match="look like probabilities"):
            softmax_probs(clipped)
        with pytest.raises(DataError, match="look like probabilities"):
            baseline_scores(clipped)
        with pytest.raises(DataError, match="probabilities, not logits"):
            fit_temperature(clipped.numpy(), y.numpy())
    with pytest.warns(UserWarning, match="returns probabilities"):
        report = wrapcal.evaluate({"softmax": model}, test=(x, y), bootstrap=0, progress=False)
    assert report.calibration["softmax"]["ece"] == pytest.approx(ece(probs, y), abs=1e-6)
    assert set(report.to_dict()["models"]["softmax"]["scores"]) == {"msp", "entropy"}


def test_nan_inputs_are_refused_unless_the_check_is_off():
    wrapped = wrapcal.wrap(SmallNet().eval())
    x = batch()
    x[3, 0, 1, 1] = float("nan")
    for call in (wrapped, wrapped.predict):
        with pytest.raises(DataError, match="1 of 8 inputs hold NaN or inf"):
            call(x)
    with pytest.raises(DataError, match="NaN or inf"):
        wrapcal.evaluate(wrapped, test=(x, torch.zeros(8, dtype=torch.long)), progress=False)
    wrapped.check_inputs = False
    assert torch.isnan(wrapped(x)[3]).all()


@pytest.mark.parametrize("plugin", ["label_smoothing", "discrepancy"])
def test_a_single_class_training_set_is_refused(plugin):
    model = SmallNet().eval()
    x, _ = labelled(model)
    one_class = torch.zeros(len(x), dtype=torch.long)
    wrapped = wrapcal.wrap(model, [plugin])
    with pytest.raises(DataError, match="'train' labels hold 1 class; it needs at least 2"):
        wrapped.fit(train=(x, one_class), unlabeled=x, progress=False)


def test_wrongly_shaped_inputs_say_what_the_model_takes():
    model = SmallNet().eval()
    x, y = labelled(model)
    wrapped = wrapcal.wrap(model, ["temperature"]).fit(calibration=(x, y), progress=False)
    with pytest.raises(DataError, match=r"one input, not a batch.*unsqueeze"):
        wrapped(x[0])
    with pytest.raises(DataError, match=r"\[4, 1, 8, 8\]; the model takes \[N, 3, 8, 8\]"):
        wrapped(x[:4, :1])
    with pytest.raises(DataError, match=r"inputs have shape \[4, 192\]"):
        wrapped.predict(x[:4].flatten(1))
    torch.manual_seed(0)
    vit = wrapcal.wrap(timm.create_model("vit_tiny_patch16_224", num_classes=3, img_size=32))
    with pytest.raises(DataError, match=r"exactly \[N, 3, 32, 32\].*resize"):
        vit(batch(2, 48))
    bare = wrapcal.wrap(SmallNet().eval())  # nothing known before fit: torch's error, explained
    with pytest.raises(DataError, match=r"backbone cannot take inputs of shape \[2, 1, 8, 8\]"):
        bare(batch(2)[:, :1])


def test_plugin_parameters_get_messages_that_name_the_fix():
    with pytest.raises(
        TypeError, match=r"temperature has no parameter 'maxiter' \(did you mean 'max_iter'"
    ):
        wrapcal.wrap(SmallNet(), [("temperature", {"maxiter": 5})])
    with pytest.raises(TypeError, match=r"plugins must be a list, e.g. plugins=\['temperature'\]"):
        wrapcal.wrap(SmallNet(), "temperature")
    with pytest.raises(ValueError, match="temperature is listed twice"):
        wrapcal.wrap(SmallNet(), ["temperature", ("temperature", {"max_iter": 5})])
    with pytest.raises(ValueError, match=r"max_iter=-1 is invalid; expected an int in \[1"):
        wrapcal.wrap(SmallNet(), [("temperature", {"max_iter": -1})])


def test_a_file_listing_its_plugins_out_of_order_gets_each_its_own_state(tmp_path):
    """State is matched to plugins by name: a file whose plugins are listed in another
    order (an older release's) loads each plugin's values and tensors, not its
    neighbour's."""
    model = SmallNet().eval()
    x, y = labelled(model)
    wrapped = wrapcal.wrap(model, ["knn", "temperature"]).fit(
        train=(x, y), calibration=(x, y), progress=False
    )
    path = wrapped.save(tmp_path / "m.wrapcal")

    stored = saving.read(path)
    other = {"plugins.0.": "plugins.1.", "plugins.1.": "plugins.0."}
    swapped = {
        other[key[:10]] + key[10:] if key[:10] in other else key: tensor
        for key, tensor in stored.tensors.items()
    }
    config = copy.deepcopy(stored.config)
    config["plugins"].reverse()
    config["digest"] = saving.digest(config, swapped)
    out = tmp_path / "swapped.wrapcal"
    out.write_bytes(save_tensors(swapped, metadata={"wrapcal": json.dumps(config)}))
    loaded = wrapcal.load(out, model=SmallNet())
    assert loaded.plugin_names == ["knn", "temperature"]
    now, then = wrapped.predict(x[:8]), loaded.predict(x[:8])
    assert torch.equal(then.probs, now.probs) and torch.equal(then.scores["knn"], now.scores["knn"])


# --- inputs and memory from a header (issue 30, items 3 and 6) ---------------------------------


def rewrite_tensors(path: Path, out: Path, edit) -> Path:
    """An attacker's file with edited tensors (and a digest that matches them)."""
    stored = saving.read(path)
    tensors = dict(stored.tensors)
    edit(tensors)
    config = {**stored.config, "digest": saving.digest(stored.config, tensors)}
    out.write_bytes(save_tensors(tensors, metadata={"wrapcal": json.dumps(config)}))
    return out


def test_a_stored_dtype_the_models_layers_do_not_take_is_refused_at_load(saved_timm, tmp_path):
    def half_head(tensors):
        for key in [k for k in tensors if k.startswith("head.")]:
            tensors[key] = tensors[key].half()

    crafted = rewrite_tensors(saved_timm[0], tmp_path / "half-head.wrapcal", half_head)
    with pytest.raises(SavedFileError, match=r"head\.(weight|bias) is torch\.float16 in the file"):
        wrapcal.load(crafted)
    model = timm.create_model("resnet10t", num_classes=4)
    with pytest.raises(SavedFileError, match="float16"):  # with the model passed too
        wrapcal.load(crafted, model=model)

    def one_buffer(tensors):
        key = next(k for k in tensors if k.endswith("running_var"))
        tensors[key] = tensors[key].double()

    with pytest.raises(SavedFileError, match=r"running_var is torch\.float64"):
        wrapcal.load(rewrite_tensors(saved_timm[0], tmp_path / "f64.wrapcal", one_buffer))

    def whole_model_in_half(tensors):
        for key in [k for k in tensors if tensors[k].is_floating_point()]:
            tensors[key] = tensors[key].half()

    # The whole model in one dtype is a model that computes: loaded as it is stored.
    loaded = wrapcal.load(
        rewrite_tensors(saved_timm[0], tmp_path / "half.wrapcal", whole_model_in_half)
    )
    assert loaded.head.weight.dtype == torch.float16


@pytest.fixture(scope="module")
def saved_small(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    wrapped = wrapcal.wrap(SmallNet(num_classes=4).eval())
    assert wrapped.head_path == "out"
    return wrapped.save(tmp_path_factory.mktemp("small") / "small.wrapcal")


@pytest.mark.parametrize(
    ("head_path", "message"),
    [
        ("__class__", "not the dotted name of a module"),
        ("_modules", "not the dotted name of a module"),
        ("conv.__class__", "not the dotted name of a module"),
        ("conv._forward_hooks", "not the dotted name of a module"),
        ("", "not the dotted name of a module"),
        (5, "not the dotted name of a module"),
        ("out.weight", "does not match the model.*no submodule 'out.weight'"),
        ("nothing.here", "does not match the model.*no submodule"),
    ],
)
def test_a_crafted_head_path_is_a_saved_file_error(saved_small, tmp_path, head_path, message):
    crafted = rewrite(
        saved_small, tmp_path / "crafted.wrapcal", lambda c: c["split"].update(head_path=head_path)
    )
    with pytest.raises(SavedFileError, match=message):
        wrapcal.load(crafted, model=SmallNet(num_classes=4))
    assert wrapcal.load(saved_small, model=SmallNet(num_classes=4)).head_path == "out"


class GridNet(nn.Module):
    """A model with a buffer that is computed, not stored, and grows as ``img_size ** 4``
    (attention-bias indices do in some timm models: LeViT, EfficientFormer V2, Swin)."""

    def __init__(self, num_classes: int = 4, img_size: int = 8) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.out = nn.Linear(8, num_classes)
        cells = img_size * img_size
        self.register_buffer("pairs", torch.zeros(cells, cells), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.conv(x)).mean(dim=(2, 3)))


@pytest.fixture
def grid_family(monkeypatch):
    from wrapcal.files import families as registry
    from wrapcal.plugin.constraints import Interval

    family = registry.ModelFamily(
        "grid",
        lambda name, kwargs: GridNet(**kwargs),
        lambda: ["gridnet"],
        lambda name: name == "gridnet",
        {"num_classes": [Interval(int, 1, 1000)], "img_size": [Interval(int, 1, 8192)]},
    )
    monkeypatch.setitem(registry.families(), "grid", family)
    return family


def test_sizes_whose_buffers_exceed_the_stored_tensors_are_refused_before_building(
    grid_family, tmp_path
):
    torch.manual_seed(0)
    wrapped = wrapcal.wrap(GridNet().eval())
    wrapped.source = {"library": "grid", "name": "gridnet", "kwargs": {"img_size": 8}}
    path = wrapped.save(tmp_path / "grid.wrapcal")
    loaded = wrapcal.load(path)  # its own size: 16 KiB of computed buffer
    with torch.no_grad():
        assert torch.equal(loaded(batch(2)), wrapped(batch(2)))
    before = _peak_rss_mb()
    # img_size 512: a 256 GiB buffer the file's 1 KiB of weights never justify. Refused on
    # the meta device; built for real, it would exhaust the memory of this machine.
    crafted = rewrite(
        path, tmp_path / "crafted.wrapcal", lambda c: c["model"]["kwargs"].update(img_size=512)
    )
    with pytest.raises(SavedFileError, match=r"buffers that are not stored.*img_size"):
        wrapcal.load(crafted)
    assert _peak_rss_mb() - before < 500


def test_an_input_shape_larger_than_the_weights_justify_is_refused(saved_timm, tmp_path):
    before = _peak_rss_mb()
    for shape in ([3, 1048575, 1048575], [1 << 19, 1 << 19], [3, 16384, 16384]):
        crafted = rewrite(
            saved_timm[0], tmp_path / "shape.wrapcal", lambda c, s=shape: c.update(input_shape=s)
        )
        with pytest.raises(SavedFileError, match="input shape .* values per input"):
            wrapcal.load(crafted)
    assert _peak_rss_mb() - before < 500
    legit = rewrite(
        saved_timm[0], tmp_path / "ok.wrapcal", lambda c: c.update(input_shape=[3, 4096, 4096])
    )
    assert wrapcal.load(legit).input_shape == (3, 4096, 4096)
