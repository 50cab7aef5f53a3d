"""The precision decision table: what "auto" picks per device class, and when an explicit bf16 warns.

torch's capability queries are mocked, so every class is checked on any machine."""

import warnings

import pytest
import torch

from diffunet.training import precision as fast

# class -> (device, ATen kernels, cpuinfo flags, oneDNN bf16, CUDA native bf16), the "auto" pick, bf16 emulated?
CLASSES = {
    "cuda bf16":             (("cuda", "AVX2", {}, False, True), "bf16", False),
    "cuda fp16":             (("cuda", "AVX512", {"avx512_bf16": True}, True, False), "fp16", False),
    "cpu AMX":               (("cpu", "AVX512", {"amx_bf16": True, "avx512_bf16": True}, True, False), "bf16", False),
    "cpu AVX512_BF16":       (("cpu", "AVX512", {"avx512_bf16": True}, True, True), "bf16", False),
    "cpu AVX512":            (("cpu", "AVX512", {"avx512_bf16": False}, True, False), "no", True),
    "cpu AVX2":              (("cpu", "AVX2", {}, False, False), "no", True),
    "cpu DEFAULT":           (("cpu", "DEFAULT", {}, False, False), "no", True),
}
# Look-alikes that must not pass for native bf16: the chip has it, but torch will not run it.
LOOKALIKES = {
    "cpu AVX2":   ("cpu", "AVX2", {"avx512_bf16": True}, False, False),     # ATEN_CPU_CAPABILITY=avx2 emulation
    "cpu AVX512": ("cpu", "AVX512", {"avx512_bf16": True}, False, False),   # oneDNN capped below AVX-512
    "cpu DEFAULT": ("cpu", "SVE256", {"bf16": True}, True, False),          # a kernel set the table does not know
}
CASES = [(cls, *spec) for cls, spec in CLASSES.items()] + \
        [(cls, spec, CLASSES[cls][1], CLASSES[cls][2]) for cls, spec in LOOKALIKES.items()]
IDS = [*CLASSES, *(f"{cls} look-alike ({spec[1]})" for cls, spec in LOOKALIKES.items())]
NAMES = ["auto", *fast.PRECISION, *fast.ALIASES]


def mock(monkeypatch, kernels, flags, onednn, cuda_bf16):
    for cap in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):                  # e.g. set to emulate an AVX2 machine
        monkeypatch.delenv(cap, raising=False)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: kernels)
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"cpu_name": "Mock CPU", **flags})
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: onednn)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: cuda_bf16)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Mock GPU")


def test_a_onednn_cap_without_bf16_instructions_is_not_native(monkeypatch):
    mock(monkeypatch, "AVX512", {"avx512_bf16": True}, True, False)         # oneDNN's own check still says yes
    assert fast.device_class("cpu") == "cpu AVX512_BF16"
    for cap in ("avx512_core_vnni", "AVX512_CORE"):
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
        assert fast.device_class("cpu") == "cpu AVX512" and resolve("auto", "cpu") == ("no", [])
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
    assert fast.device_class("cpu") == "cpu AVX512_BF16"


def resolve(name, device, what="train.mixed_precision"):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = fast.resolve_precision(name, device, what)
    return got, [str(w.message) for w in caught if issubclass(w.category, fast.PrecisionWarning)]


@pytest.mark.parametrize("cls, spec, auto, emulated", CASES, ids=IDS)
def test_auto_picks_by_device_class(monkeypatch, cls, spec, auto, emulated):
    device, *queries = spec
    mock(monkeypatch, *queries)
    assert fast.device_class(device) == cls
    assert resolve("auto", device) == (auto, [])
    line = fast.describe_device(device)
    assert "\n" not in line and ("Mock GPU" if device == "cuda" else "Mock CPU") in line and f"-> {auto!r}" in line


@pytest.mark.parametrize("cls, spec, auto, emulated", CASES, ids=IDS)
@pytest.mark.parametrize("name", NAMES)
def test_bf16_warns_exactly_on_a_cpu_without_native_bf16(monkeypatch, cls, spec, auto, emulated, name):
    device, *queries = spec
    mock(monkeypatch, *queries)
    explicit = fast.ALIASES.get(name, name)
    got, messages = resolve(name, device, "--dtype")
    assert got == (auto if name == "auto" else explicit)
    assert len(messages) == (explicit == "bf16" and emulated)
    for m in messages:
        assert m.startswith(f"bf16 on this CPU ({cls.removeprefix('cpu ')}, no native bf16) is emulated and ")
        assert m.endswith(" than fp32; use --dtype=auto or no") and "\n" not in m


def test_the_avx2_warning_reads_as_documented_and_goes_to_warn_when_given(monkeypatch):
    mock(monkeypatch, "AVX2", {}, False, False)
    line = ("bf16 on this CPU (AVX2, no native bf16) is emulated and ~10-35x slower than fp32; "
            "use train.mixed_precision=auto or no")
    assert resolve("bf16", "cpu") == ("bf16", [line])
    printed = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")                                 # nothing through warnings.warn
        assert fast.resolve_precision("bf16", "cpu", warn=printed.append) == "bf16"
        assert fast.resolve_precision("auto", "cpu", warn=printed.append) == "no"
    assert printed == [line]


@pytest.mark.parametrize("name", ["fp8", "Auto", "", "float64"])
def test_an_unknown_name_fails_with_the_valid_ones(name):
    with pytest.raises(ValueError) as e:
        fast.resolve_precision(name, "cpu")
    assert str(e.value) == f"unknown train.mixed_precision {name!r}; choose one of 'auto', 'no', 'bf16', 'fp16'"


def test_the_real_probe_names_a_class_that_this_cpus_capabilities_bear_out():
    """A smoke test of the hardware probe on the machine that runs it, nothing mocked: the tests above cover the
    decision for every class; this one checks that torch's real queries give a class of the table, and that the
    capability the class is named for is one torch reports here. Which class that is varies by machine."""
    cls = fast.device_class("cpu")
    assert cls in fast.DEVICES and cls.startswith("cpu ")
    kernels, flags = torch.backends.cpu.get_cpu_capability(), torch.cpu.get_capabilities()
    evidence = {"cpu AMX": kernels == "AVX512" and flags.get("amx_bf16"),
                "cpu AVX512_BF16": kernels == "AVX512" and flags.get("avx512_bf16"),
                "cpu AVX512": kernels == "AVX512",
                "cpu AVX2": kernels == "AVX2",
                "cpu DEFAULT": kernels not in ("AVX512", "AVX2")}       # ARM's SVE, "DEFAULT", ...
    assert evidence[cls], f"class {cls!r}, but torch reports kernels {kernels!r}"
    assert resolve("auto", "cpu")[1] == []                           # auto never picks an emulated bf16


def test_auto_resolves_in_a_real_run_and_is_saved_in_the_config(tmp_path):
    """``train.mixed_precision=auto`` resolves on this machine to what the table says and the run's saved
    config records the choice, not "auto"."""
    from omegaconf import OmegaConf
    from diffunet.training.loop import train
    from test_training import fast_cfg

    train(fast_cfg(tmp_path, "train.max_steps=1", "train.mixed_precision=auto", "sample.num_images=1"))
    saved = OmegaConf.load(tmp_path / "run" / "config.yaml").train.mixed_precision
    assert saved == fast.resolve_precision("auto", "cpu") and saved in ("no", "bf16")


# ------------------------------------------------------------------------------------------ the launcher's word

@pytest.mark.parametrize("launcher,asked,want", [
    ("no", "auto", "no"),               # accelerate launch --mixed_precision no: fp32, though auto picks bf16 here
    ("bf16", "auto", "bf16"),
    ("bf16", "bf16", "bf16"),
    ("no", "False", "no"),              # YAML's reading of a bare train.mixed_precision=no
    (None, "auto", "bf16"),             # python train.py: auto by the device
    (None, "no", "no"),
])
def test_the_launchers_precision_rules_over_auto(monkeypatch, launcher, asked, want):
    mock(monkeypatch, "AVX512", {"amx_bf16": True}, True, False)        # a CPU where auto picks bf16
    environ = {} if launcher is None else {fast.LAUNCHER_PRECISION: launcher}
    got, said = fast.training_precision(asked, "cpu", environ=environ)
    assert got == want
    if asked == "auto":
        assert said.startswith(f"train.mixed_precision=auto: {want}")
        assert ("the launcher's" in said) == (launcher is not None)


def test_emulated_bf16_from_the_launcher_is_advised_at_the_launcher(monkeypatch):
    mock(monkeypatch, "AVX2", {}, False, False)
    notes = []
    assert fast.training_precision("auto", "cpu", warn=notes.append, environ={fast.LAUNCHER_PRECISION: "bf16"})[0] \
        == "bf16"
    assert notes == ["bf16 on this CPU (AVX2, no native bf16) is emulated and ~10-35x slower than fp32; use "
                     "accelerate launch --mixed_precision no"]


@pytest.mark.parametrize("launcher,asked", [("bf16", "no"), ("no", "bf16")])
def test_an_explicit_precision_that_contradicts_the_launcher_is_one_line(monkeypatch, launcher, asked, tmp_path):
    from diffunet.config import ConfigError
    from diffunet.training.loop import train
    from test_training import fast_cfg

    monkeypatch.setenv(fast.LAUNCHER_PRECISION, launcher)
    with pytest.raises(ConfigError) as e:
        train(fast_cfg(tmp_path, f"train.mixed_precision={asked}"))
    assert str(e.value) == (f"train.mixed_precision={asked} but the launcher says mixed_precision={launcher} "
                            f"(ACCELERATE_MIXED_PRECISION: accelerate launch's --mixed_precision, or your accelerate "
                            f"config, 'no' where neither says): make them agree, or leave train.mixed_precision=auto "
                            f"to follow the launcher")
    assert not (tmp_path / "run").exists()                              # refused before anything was written
