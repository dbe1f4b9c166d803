"""The LoRA recipes (``launch/configs/wan2.1-t2v-1.3b-lora.yaml``, ``wan2.2-ti2v-5b-i2v-lora.yaml``) and
the planner's LoRA case (``parallel.plan_lora``'s ``Finetune``, ``launch.dryrun.lora_options``).

The recipes are their full fine-tune recipe's model, data, diffusion and sampling setup plus
``finetune.lora``; their dry run passes on a tiny local stand-in of the pipeline root (what the dry run
reads of one: the tiny random transformer and VAE of ``tests/launch/test_wan_recipes.py``, saved, and
the text encoder's config.json) and says what fits a 24/48/80 GB GPU. The planner's LoRA states
count the adapters peft really injects (``launch.lora.apply_lora`` on a meta model), and the options it
suggests for a LoRA of Wan2.1-T2V-14B at 81×480p are the fewest that fit. What only a GPU run can
confirm: the predicted memory itself (``torch.cuda.max_memory_allocated`` of a real step).
"""

import copy
import dataclasses

import pytest
import torch

from dit.config import get_preset
from dit.model import SpacetimeDiT
from launch.config import CONFIG_DIR, LoraConfig, load_config
from launch.dryrun import lora_options
from launch.lora import apply_lora, store_base
from parallel.dims import ParallelDims
from parallel.plan import GIB, plan
from parallel.plan_lora import BASE_BYTES, Finetune, adapter_params
from tests.launch.test_wan_recipes import TEXT_DIM, _dry_run, _placeholders, _stand_in, _vae

LORA = {"wan2.1-t2v-1.3b-lora": "wan2.1-t2v-1.3b-finetune", "wan2.2-ti2v-5b-i2v-lora": "wan2.2-ti2v-5b-i2v"}
SAME = ("model", "init", "data", "diffusion", "sample", "eval", "logging")  # as the full recipe


def _path(name: str):
    return CONFIG_DIR / f"{name}.yaml"


@pytest.mark.parametrize("recipe", sorted(LORA))
def test_lora_recipe_is_its_full_recipe_with_adapters_on_a_bf16_base(recipe):
    lora, full = (load_config(_path(n), _placeholders()) for n in (recipe, LORA[recipe]))
    for section in SAME:
        assert getattr(lora, section) == getattr(full, section), section
    assert lora.train.task_i2v == full.train.task_i2v and lora.train.lr > full.train.lr
    ft = lora.finetune
    assert ft.lora.enabled and ft.lora.rank == 32 and ft.lora.scale == 1.0 and ft.base_dtype == "bf16"
    assert ft.lora.targets == LoraConfig().targets and full.finetune.lora.rank == 0


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A Wan2.1 pipeline root as the dry run reads it, shared by the dry runs of this module: the tiny
    random transformer (config.json and the safetensors header) and VAE (config.json), saved with
    diffusers, and the UMT5 encoder's config.json (its width; no weights, no tokenizer: the dry run
    reads neither)."""
    from transformers import UMT5Config

    from tests.launch.diffusers_models import build_wan, write_wan_index

    root = tmp_path_factory.mktemp("wan-lora-root")
    build_wan("t2v", seed=1).save_pretrained(root / "transformer")
    _vae("wan2.1-t2v-1.3b-lora").save_pretrained(root / "vae")
    UMT5Config(d_model=TEXT_DIM, d_kv=8, d_ff=32, num_layers=1, num_heads=2).save_pretrained(
        root / "text_encoder"
    )
    write_wan_index(root)
    return root


def test_lora_recipe_dry_run_says_what_fits(root, tmp_path, capsys):
    recipe = "wan2.1-t2v-1.3b-lora"
    overrides = [*_stand_in(root, tmp_path), "train.ema_decay=0"]
    code, report, err = _dry_run(capsys, recipe, [*overrides])
    assert code == 0 and report["ok"], err
    fit = report["lora_fit"]
    assert fit["bucket"] == report["plan_bucket"] and [g["gpu_gib"] for g in fit["gpus"]] == [24, 48, 80]
    plan_ = report["plan"]
    assert (
        plan_["settings"]["finetune"]["lora_rank"] == 32
        and plan_["settings"]["finetune"]["base_dtype"] == "bf16"
    )
    arch = load_config(_path(recipe), overrides).model.arch
    assert plan_["params"]["trainable"] == arch.depth * adapter_params(arch, 32)
    # a tiny stand-in fits everywhere as configured: no option to turn on
    assert all(g["fits"] and g["options"] == {} for g in fit["gpus"])
    # block swap needs whole blocks: under FSDP sharding (world size 8, dp_shard -1) the dry run refuses it
    code, report, err = _dry_run(capsys, recipe, [*overrides, "finetune.block_swap=1"])
    assert code == 2 and any(
        "finetune.block_swap=1" in e and "parallel.cpu_offload" in e for e in report["errors"]
    )


def test_planner_counts_the_adapters_peft_injects():
    arch = get_preset("tiny", depth=2)
    with torch.device("meta"):
        model = SpacetimeDiT(arch)
    report = apply_lora(model, LoraConfig(rank=4))
    assert report.trainable == arch.depth * adapter_params(arch, 4)
    # states: fp32 adapters with gradients, AdamW and EMA; the parameters as store_base keeps them (plain
    # linears in the base dtype, the fp32-compute layers, norms and tables in fp32, adapters fp32)
    for dtype in BASE_BYTES:
        stored = copy.deepcopy(model)
        store_base(stored, dtype)
        stored_bytes = sum(p.numel() * p.element_size() for p in stored.parameters())
        p = plan(arch, 4, 8, 8, text_len=8, finetune=Finetune(4, dtype), ema=True)
        mem = {k: v * GIB for k, v in p["memory_breakdown_gib"].items()}
        assert mem["optimizer"] == pytest.approx(8 * report.trainable)
        assert mem["grads"] == pytest.approx(4 * report.trainable) == pytest.approx(mem["ema"])
        assert mem["params"] == pytest.approx(stored_bytes), dtype


def _wan14b_options(rank: int):
    overrides = [
        *_placeholders(),
        "model.preset=wan2.1-t2v-14b",
        "parallel.dp_shard=1",
        f"finetune.lora.rank={rank}",
    ]
    cfg = load_config(_path("wan2.1-t2v-1.3b-lora"), overrides)
    bucket = {"name": "81x480x832", "batch_size": 1, "latent": {"t": 21, "h": 60, "w": 104}}
    return cfg, {g["gpu_gib"]: g for g in lora_options(cfg, bucket, ParallelDims(1, 1, 1, 1, 1))}


def test_wan14b_lora_at_480p_gets_the_fewest_options_that_fit():
    cfg, fits = _wan14b_options(16)
    arch, depth = cfg.model.arch, cfg.model.arch.depth

    def memory(ft: Finetune) -> float:
        return plan(arch, 21, 60, 104, text_len=512, ac="full", ema=False, finetune=ft)["memory_gib"]

    # as configured (full checkpointing, bf16 base) it fits 80 GB only
    assert fits[80]["fits"] and fits[80]["options"] == {} and not fits[48]["fits"] and not fits[24]["fits"]
    # 48 GB: activation offload and a few swapped blocks of the bf16 base, not the fp8 base
    g48 = fits[48]
    swap48 = g48["options"]["finetune.block_swap"]
    assert g48["options"] == {"parallel.activation_offload": True, "finetune.block_swap": swap48}
    assert 0 < swap48 < depth
    assert (
        g48["fits_with_options"] and g48["memory_with_options_gib"] <= g48["usable_gib"] < g48["memory_gib"]
    )
    # fewest: one swapped block less does not fit
    ft = Finetune(16, "bf16", swap48 - 1, True)
    assert memory(ft) > g48["usable_gib"]
    # and without activation offload (the step before block swap) 48 GB does not fit either
    assert memory(dataclasses.replace(ft, block_swap=0, activation_offload=False)) > g48["usable_gib"]
    # 24 GB: not even with every option (fp8 base, activation offload, every block swapped), at rank 16
    # or at the recipe's 32; the answer says so, which options it tried and how far it still is
    for rank in (16, 32):
        g = (fits if rank == 16 else _wan14b_options(rank)[1])[24]
        assert not g["fits"] and not g["fits_with_options"], rank
        assert g["options"] == {
            "finetune.base_dtype": "fp8",
            "parallel.activation_offload": True,
            "finetune.block_swap": depth,
        }
        everything = memory(Finetune(rank, "fp8", depth, True))
        assert g["memory_with_options_gib"] == pytest.approx(everything)
        assert g["usable_gib"] < g["memory_with_options_gib"] < g["memory_gib"]
