"""init.from a diffusers model (every source kind), strict loading with ``init.new``, init.expert and
``model.preset=from_init``, on tiny random diffusers Wan models saved by the tests (CPU, fp32).

The reference weights are the ones :func:`launch.interop.to_ours` gives for the same folder (its own
parity with diffusers' forward is ``tests/launch/test_interop.py``); the forward checks here compare with
diffusers' module itself.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from dit.model import build_model
from launch import interop
from launch.config import load_config, to_yaml
from launch.export import write_export
from launch.finetune import apply_init, source_arch
from parallel import checkpoint as ckpt
from parallel.checkpoint import CheckpointError
from tests.launch.conftest import (
    assert_same_losses,
    losses_by_step,
    metrics,
    run,
    train_cmd,
    train_in_process,
)
from tests.launch.diffusers_models import build_wan, tiny_wan, tiny_wan_pipeline_root

GEN_SEED = 0


# init.allow_arch_changes is read from a config once launch.config's InitConfig has the field and
# launch.engine.initial_model passes it to apply_init (the integrator's part of review fix M4)
def _ours(path, **read):
    return interop.to_ours(interop.read_diffusers(path, **read))


def _inputs(cfg, frames: int = 2):
    gen = torch.Generator().manual_seed(GEN_SEED)
    x = torch.randn(2, cfg.in_channels, frames, 6, 10, generator=gen)  # a non-square grid
    ctx = torch.randn(2, 7, cfg.text_dim, generator=gen)
    return x, torch.tensor([937.5, 12.25]), ctx


def _source(tmp_path, kind: str):
    """The same tiny Wan (seed 0) as each kind of init.from source."""
    if kind == "folder":
        return tiny_wan(tmp_path)
    if kind == "pipeline":
        return tiny_wan_pipeline_root(tmp_path)
    if kind == "index":  # shards of ≤ 20 kB and their index, as save_pretrained writes a large model
        out = tmp_path / "sharded"
        build_wan("t2v", 0).save_pretrained(out, max_shard_size="20KB")
        assert (out / "diffusion_pytorch_model.safetensors.index.json").is_file()
        return out
    return tiny_wan(tmp_path) / "diffusion_pytorch_model.safetensors"  # one file, config.json beside it


@pytest.mark.parametrize("kind", ["folder", "pipeline", "index", "file"])
def test_every_diffusers_source_kind_loads_every_tensor(tmp_path, kind):
    want_cfg, want = _ours(tiny_wan(tmp_path / "ref"))
    path = _source(tmp_path, kind)
    assert source_arch(path) == want_cfg  # model.preset=from_init's architecture
    model = build_model(want_cfg, seed=1)
    report = apply_init(model, path, want_cfg)
    assert sorted(report.loaded) == sorted(want) and not (report.missing or report.inflated)
    for name, value in model.state_dict().items():
        assert torch.equal(value, want[name]), name


def test_two_expert_root_needs_init_expert_and_loads_the_named_one(tmp_path):
    root = tiny_wan_pipeline_root(tmp_path, experts=2)
    high_cfg, high = _ours(root / "transformer")
    _, low = _ours(root / "transformer_2")
    model = build_model(high_cfg, seed=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=rf"init.from={root}: .*two-expert.*set init.expert"):
        apply_init(model, root, high_cfg)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match=rf"init.from={root}: .*two-expert.*set init.expert"):
        load_config(_yaml(tmp_path, root))  # from_init reads the architecture the same way
    for expert, want in (("high_noise", high), ("low_noise", low)):
        model = build_model(high_cfg, seed=1)
        apply_init(model, root, high_cfg, expert=expert)
        assert all(torch.equal(v, want[k]) for k, v in model.state_dict().items())
    assert not torch.equal(high["final.linear.weight"], low["final.linear.weight"])  # other weights
    assert load_config(_yaml(tmp_path, root, "  expert: low_noise\n")).model.arch == high_cfg
    with pytest.raises(ValueError, match=r"init.expert='low_noise'.*not a diffusers model"):
        apply_init(
            build_model(high_cfg), _export(tmp_path, root / "transformer"), high_cfg, expert="low_noise"
        )


def test_a_renamed_or_empty_weights_file_is_an_error_not_a_fresh_start(tmp_path):
    folder = tiny_wan(tmp_path)
    cfg, _ = _ours(folder)
    weights = folder / "diffusion_pytorch_model.safetensors"
    model = build_model(cfg, seed=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    weights.rename(folder / "diffusion_pytorch_model.safetensors.bak")
    with pytest.raises(
        FileNotFoundError, match=rf"init.from={folder}: .*diffusion_pytorch_model.safetensors"
    ):
        apply_init(model, folder, cfg)
    weights.write_bytes(b"")
    with pytest.raises(CheckpointError, match=rf"init.from={folder}: a weights file is not readable"):
        apply_init(model, folder, cfg)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_missing_tensors_are_an_error_unless_init_new_lists_them(tmp_path):
    ref = build_wan("t2v", 0)
    folder = tmp_path / "wan"
    ref.save_pretrained(folder)
    cfg, _ = _ours(folder)
    deeper = cfg.replace(depth=cfg.depth + 1)  # one block the source lacks
    model = build_model(deeper, seed=1)
    n_new = sum(n.startswith(f"blocks.{cfg.depth}.") for n, _ in model.named_parameters())
    with pytest.raises(ValueError) as e:
        apply_init(model, folder, deeper)
    said = str(e.value)
    n_all = len(list(model.parameters()))
    assert f"init.from={folder}: {n_new} of the model's {n_all} parameters would start fresh" in said
    assert f'init.new=["blocks.{cfg.depth}.*"]' in said and f"blocks.{cfg.depth}.attn" in said
    with pytest.raises(ValueError, match=r"init.new: pattern 'blockz.\*' matches no parameter"):
        apply_init(model, folder, deeper, new=[f"blocks.{cfg.depth}.*", "blockz.*"])

    report = apply_init(model, folder, deeper, new=[f"blocks.{cfg.depth}.*"])
    assert len(report.missing) == n_new and all(n.startswith(f"blocks.{cfg.depth}.") for n in report.missing)
    # the new block starts as the identity: the deeper model computes what the source computes
    x, t, ctx = _inputs(cfg)
    with torch.no_grad():
        want = ref(x, t, ctx, return_dict=False)[0]
        got = model.eval()(x, t, ctx)
    assert ((got - want).norm() / want.norm()).item() <= 1e-5


def test_more_input_channels_inflate_and_count_as_loaded(tmp_path):
    """Image-to-video: cond_channels more inputs, the new ones start at zero; no init.new needed."""
    ref = build_wan("t2v", 0)
    folder = tmp_path / "wan"
    ref.save_pretrained(folder)
    cfg, _ = _ours(folder)
    i2v = cfg.replace(cond_channels=3)
    model = build_model(i2v, seed=1)
    report = apply_init(model, folder, i2v)
    assert report.inflated == ["patch_embed.proj.weight"] and not report.missing
    x, t, ctx = _inputs(cfg)
    cond = torch.randn(2, 3, *x.shape[2:], generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = ref(x, t, ctx, return_dict=False)[0]
        got = model.eval()(x, t, ctx, cond=cond)
    assert ((got - want).norm() / want.norm()).item() <= 1e-5


def _yaml(tmp_path, source, init_extra: str = "", arch: str = "") -> str:
    path = tmp_path / "ft.yaml"
    model = "model:\n  preset: from_init\n" + ("  arch:\n" + arch if arch else "")
    path.write_text(f"{model}init:\n  from: {source}\n{init_extra}")
    return str(path)


def _export(tmp_path, folder):
    cfg, state = _ours(folder)
    return write_export(tmp_path / "export", cfg, state, {"step": None, "source": str(folder)})


def test_from_init_takes_the_sources_architecture_and_text_convention(tmp_path):
    folder = tiny_wan(tmp_path)
    want, state = _ours(folder)
    cfg = load_config(_yaml(tmp_path, folder))
    assert cfg.model.preset == "from_init" and cfg.model.arch == want
    assert (want.text_mask, want.text_null, want.text_len) == (False, "empty_prompt", 512)
    assert cfg.data.max_text_len == 512  # the length Wan was trained at
    # the file's and the overrides' model.arch.* apply on top
    cfg = load_config(_yaml(tmp_path, folder, arch="    text_len: 24\n"), ["model.arch.norm_eps=1e-5"])
    assert cfg.model.arch == want.replace(text_len=24, norm_eps=1e-5) and cfg.data.max_text_len == 24

    # an export's config.json and a checkpoint's config.yaml name the architecture as well
    export = _export(tmp_path, folder)
    assert load_config(_yaml(tmp_path, export)).model.arch == want
    saved = tmp_path / "saved.yaml"
    saved.write_text(to_yaml(cfg))
    run_root = tmp_path / "run" / "checkpoints"
    step = {"model": state, "ema": state, "step": torch.tensor(1)}
    ckpt.save(run_root, 1, step, {}, rank=0, files={"config.yaml": saved.read_text()})
    for src in (run_root.parent, run_root / "step-00000001"):
        assert load_config(_yaml(tmp_path, src)).model.arch == cfg.model.arch

    # a run's saved config sets every arch field: it loads without its source
    shutil.rmtree(folder)
    assert load_config(saved).model.arch == cfg.model.arch


def test_from_init_errors_name_init_from(tmp_path):
    with pytest.raises(ValueError, match="model.preset=from_init takes the architecture from init.from, but"):
        load_config(_yaml(tmp_path, '""'))
    with pytest.raises(FileNotFoundError, match=rf"init.from={tmp_path / 'nowhere'}: no such file"):
        load_config(_yaml(tmp_path, tmp_path / "nowhere"))
    other = tmp_path / "flux"
    other.mkdir()
    (other / "config.json").write_text(
        json.dumps({"_class_name": "FluxTransformer2DModel", "_diffusers_version": "0.42.1"})
    )
    torch.manual_seed(0)
    from safetensors.torch import save_file

    save_file({"x_embedder.weight": torch.randn(4, 4)}, other / "diffusion_pytorch_model.safetensors")
    with pytest.raises(ValueError, match=rf"init.from={other}: .*'FluxTransformer2DModel' is not supported"):
        load_config(_yaml(tmp_path, other))
    with pytest.raises(ValueError, match="model.preset='nope': expected one of .*from_init"):
        load_config(None, ["model.preset=nope"])


# ---- through the trainer -----------------------------------------------------------------------------
@pytest.mark.slow
def test_init_from_a_diffusers_wan_trains_resumes_exactly_and_exports(tmp_path, overrides):
    """A fine-tune config naming only the source (and the run's data): trains, resumes bit for bit
    from a checkpoint, and its checkpoint exports to a folder stock diffusers loads and that computes
    what the run's model computes. A renamed weights file stops the trainer before any step."""
    from diffusers import WanTransformer3DModel

    from launch.export import load_model
    from launch.export import main as export

    # the pixel codec's 48 channels and MiniLM's 384-wide states
    folder = tiny_wan(tmp_path, in_channels=48, out_channels=48, text_dim=384)
    # MiniLM captions padded to 24, not Wan's 512: a change of function the config opts in to
    config = _yaml(tmp_path, folder, "  allow_arch_changes: [text_len]\n", arch="    text_len: 24\n")
    extra = ["train.steps=4", "checkpoint.every=2", "checkpoint.keep=0"]
    # the first run in this process (CI time), the resume a process of its own
    logged = train_in_process(tmp_path / "run", *overrides, *extra, config=config)
    n = len(_ours(folder)[1])
    assert f"init.from={folder}: {n} loaded" in logged and "missing" not in logged
    want = {s: v[0] for s, v in losses_by_step(metrics(tmp_path / "run")).items()}
    assert sorted(want) == [1, 2, 3, 4]

    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step-00000004")  # as if stopped after step 3
    proc = run([*train_cmd(tmp_path / "run", *extra, overrides=overrides), "--config", config])
    assert proc.returncode == 0 and "resumed from" in proc.stderr, proc.stderr[-3000:]
    assert_same_losses(tmp_path / "run", want)

    out = tmp_path / "diffusers"
    export([str(tmp_path / "run"), str(out), "--format", "diffusers"])  # in this process: CI time
    ours, theirs = load_model(tmp_path / "run"), WanTransformer3DModel.from_pretrained(out).eval()
    x, t, ctx = _inputs(load_config(tmp_path / "run" / "config.yaml").model.arch)
    with torch.no_grad():
        a, b = ours(x, t, ctx), theirs(x, t, ctx, return_dict=False)[0]
    assert ((a - b).norm() / b.norm()).item() <= 1e-5

    (folder / "diffusion_pytorch_model.safetensors").rename(folder / "weights.old")
    proc = run([*train_cmd(tmp_path / "run2", "train.steps=1", overrides=overrides), "--config", config])
    assert proc.returncode != 0 and f"init.from={folder}" in proc.stderr
    assert not (tmp_path / "run2" / "checkpoints").is_dir()


def test_the_trainers_initial_model_takes_init_expert_and_init_new(tmp_path):
    """``launch.engine.initial_model`` (what every training rank builds) passes ``init.expert`` and
    ``init.new`` on: the low-noise expert of a two-expert root loads into a model one block deeper
    when the new block is listed, and is refused when it is not."""
    from launch.engine import initial_model

    root = tiny_wan_pipeline_root(tmp_path, experts=2)
    _, low = _ours(root / "transformer_2")
    yaml = _yaml(tmp_path, root, "  expert: low_noise\n")
    depth = load_config(yaml).model.arch.depth
    cfg = load_config(yaml, [f"model.arch.depth={depth + 1}", f'init.new=["blocks.{depth}.*"]'])
    state = initial_model(cfg).state_dict()
    assert all(torch.equal(state[k], v) for k, v in low.items())  # the named expert, every tensor
    assert torch.count_nonzero(state[f"blocks.{depth}.attn.o.weight"]) == 0  # new block: identity
    with pytest.raises(ValueError, match=rf'init.new=\["blocks.{depth}.\*"\]'):
        initial_model(load_config(yaml, [f"model.arch.depth={depth + 1}"]))


def test_from_init_reads_only_the_config_and_the_tensor_headers(tmp_path):
    """``model.preset=from_init`` needs the architecture, not the weights: it reads ``config.json`` and
    the safetensors headers (names, shapes, dtypes), so a 14B source is not loaded on every rank just to
    build the config. Here the weights' data bytes are cut off: the architecture still comes out (equal
    to a full read's), while loading the weights is the named error."""
    folder = tiny_wan(tmp_path)
    want, _ = _ours(folder)
    weights = folder / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    header = 8 + int.from_bytes(data[:8], "little")
    weights.write_bytes(data[: header + 16])  # the header whole, the tensor data gone
    assert source_arch(folder) == want
    assert load_config(_yaml(tmp_path, folder)).model.arch == want
    with pytest.raises(CheckpointError, match=rf"init.from={folder}: a weights file is not readable"):
        apply_init(build_model(want, seed=1), folder, want)


# ---- a model that would compute another function (same tensors, other arch) ---------------------------
_LTX_CHANGES = [
    {"pos_embed": "rope3d"},
    {"block_norm": "layernorm"},
    {"text_mask": False},
    {"qk_norm_eps": None},  # None: norm_eps (1e-6), not LTX's 1e-5
    {"rope_compression": (4, 16, 16)},
]
_WAN_CHANGES = [
    {"qk_norm": "none"},  # would drop the source's q/k norm weights
    {"num_heads": 4},  # the across-heads norm and the projections keep their shapes
    {"attention_layout": "factorized"},
    {"text_mask": True, "text_null": "masked"},  # our convention instead of Wan's
    {"text_len": 24},  # Wan attends its zero padding: the padded length is part of the function
    {"norm_eps": 1e-5},
    {"rope_theta": 500.0},
]


@pytest.mark.parametrize(
    ("family", "change"), [("ltx", c) for c in _LTX_CHANGES] + [("wan", c) for c in _WAN_CHANGES]
)
def test_a_model_computing_another_function_is_refused_naming_each_field(tmp_path, family, change):
    """Review M4: the same tensors in a model whose arch differs in a field that changes the function
    (not a shape) loaded silently ("65 loaded"). Now an error naming ``model.arch.FIELD: source →
    model``, suggesting ``model.preset=from_init`` and ``init.allow_arch_changes``, before any weight
    changes; with the fields listed in ``init.allow_arch_changes`` every tensor loads."""
    from tests.launch.diffusers_models import tiny_ltx

    folder = tiny_ltx(tmp_path) if family == "ltx" else tiny_wan(tmp_path)
    src, want = _ours(folder)
    arch = src.replace(**change)
    model = build_model(arch, seed=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=rf"init.from={folder}: the model would compute another") as e:
        apply_init(model, folder, arch)
    said = str(e.value)
    for name, value in change.items():
        assert f"model.arch.{name}: {getattr(src, name)!r} → {value!r}" in said
    assert "model.preset=from_init" in said and f"init.allow_arch_changes={json.dumps(list(change))}" in said
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())

    report = apply_init(model, folder, arch, allow_arch_changes=list(change))  # on purpose
    assert sorted(report.loaded) == sorted(n for n, _ in model.named_parameters())
    assert all(torch.equal(v, want[k]) for k, v in model.state_dict().items())
    dropped = sorted(set(want) - set(report.loaded))
    assert report.unexpected == dropped and bool(dropped) == ("qk_norm" in change)


def test_an_unknown_allow_arch_changes_field_is_named(tmp_path):
    folder = tiny_wan(tmp_path)
    src, _ = _ours(folder)
    with pytest.raises(ValueError, match=r"init.allow_arch_changes: 'txt_mask' is not a model.arch field"):
        apply_init(build_model(src, seed=1), folder, src, allow_arch_changes=["txt_mask"])


def test_a_shallower_model_drops_diffusers_blocks_only_when_depth_is_allowed(tmp_path):
    """A diffusers source's tensors all have a place in a model of its architecture; blocks past the
    model's depth would be dropped: an error unless ``init.allow_arch_changes`` names ``depth``."""
    folder = tiny_wan(tmp_path)
    src, want = _ours(folder)
    arch = src.replace(depth=src.depth - 1)
    last = f"blocks.{arch.depth}."
    with pytest.raises(ValueError, match=rf"would be dropped \({last}.*source has {src.depth} blocks") as e:
        apply_init(build_model(arch, seed=1), folder, arch)
    assert 'init.allow_arch_changes=["depth"]' in str(e.value)
    model = build_model(arch, seed=1)
    report = apply_init(model, folder, arch, allow_arch_changes=["depth"])
    assert report.unexpected == sorted(n for n in want if n.startswith(last)) and report.unexpected
    assert all(torch.equal(v, want[k]) for k, v in model.state_dict().items())


def test_changes_that_keep_the_function_or_adapt_it_need_no_opt_in(tmp_path):
    """Not a function change: the caption length of a masked convention (LTX), an explicit q/k epsilon
    equal to the one the source uses, the attention kernel. The deliberate adaptations (more input
    channels, a deeper model with init.new, a new text width, an fps embedder) change shapes or add
    layers and keep working (their forward checks are above and in test_finetune.py)."""
    from tests.launch.diffusers_models import tiny_ltx

    ltx = tiny_ltx(tmp_path)
    src, _ = _ours(ltx)
    assert src.text_mask and src.qk_norm_eps == 1e-5
    same = src.replace(text_len=64, attention_backend="math")
    apply_init(build_model(same, seed=1), ltx, same)
    wan_src, _ = _ours(tiny_wan(tmp_path))
    explicit = wan_src.replace(qk_norm_eps=wan_src.norm_eps)
    apply_init(build_model(explicit, seed=1), tiny_wan(tmp_path, name="again"), explicit)
    adapted = wan_src.replace(
        cond_channels=2, depth=wan_src.depth + 1, text_dim=wan_src.text_dim * 2, fps_conditioning=True
    )
    new = [f"blocks.{wan_src.depth}.*", "text_proj.*", "fps_embedder.*"]
    report = apply_init(build_model(adapted, seed=1), tiny_wan(tmp_path, name="third"), adapted, new=new)
    assert report.inflated == ["patch_embed.proj.weight"] and report.reinitialised and report.missing


def test_the_published_presets_compute_what_the_published_configs_do():
    """The recipes name a preset (``wan2.1-t2v-1.3b`` …) and init.from the published folder: the
    function check must find no difference between the preset and what to_ours reads from the published
    config.json (built on the meta device: no weights)."""
    import diffusers

    from dit.config import PRESETS
    from launch.finetune import arch_changes
    from tests.dit.test_presets import PUBLISHED

    for name, (class_name, config) in PUBLISHED.items():
        with torch.device("meta"):
            theirs = getattr(diffusers, class_name).from_config(config)
        source = interop.DiffusersModel(class_name, dict(theirs.config), dict(theirs.state_dict()), None)
        cfg, _ = interop.to_ours(source)
        assert arch_changes(cfg, PRESETS[name]) == {}, name
        assert arch_changes(cfg, PRESETS["video-1b3"]), name  # and the check sees our own preset's


def test_the_trainers_initial_model_takes_init_allow_arch_changes(tmp_path):
    """``init.allow_arch_changes`` reaches ``apply_init`` from a config: a Wan source fine-tuned at
    another caption length (its padding is attended, so the length is part of the function) is refused
    by ``launch.engine.initial_model`` naming the field, and loads every tensor once the config lists it."""
    from launch.engine import initial_model

    folder = tiny_wan(tmp_path)
    _, want = _ours(folder)
    yaml = _yaml(tmp_path, folder)
    cfg = load_config(yaml)
    with pytest.raises(
        ValueError, match=r"model.arch.text_len: 512 → 24.*allow_arch_changes=\[\"text_len\"\]"
    ):
        initial_model(load_config(yaml, ["model.arch.text_len=24"]))
    cfg = load_config(yaml, ["model.arch.text_len=24", "init.allow_arch_changes=[text_len]"])
    assert cfg.init.allow_arch_changes == ["text_len"]
    state = initial_model(cfg).state_dict()
    assert all(torch.equal(state[k], v) for k, v in want.items())
    with pytest.raises(ValueError, match=r"init.allow_arch_changes: 'txt_len' is not a model.arch field"):
        initial_model(load_config(yaml, ["model.arch.text_len=24", "init.allow_arch_changes=[txt_len]"]))
