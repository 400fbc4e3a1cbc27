"""The config schema: loading, overrides, every validation rule, hashing and the GatePro schedule."""
from __future__ import annotations

import math
import os
from pathlib import Path

import pytest

from gatepro_dist.config import (
    HASH_EXCLUDED_KEYS, Config, ConfigError, GateProConfig, all_keys, config_from_dict,
    config_hash, gatepro_enabled_at, help_text, load_config,
)
from gatepro_dist.config_checks import validate

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    """Relative run_dirs resolve inside a scratch directory, never the repository."""
    monkeypatch.chdir(tmp_path)


def _fails(excinfo: pytest.ExceptionInfo, *fragments: str) -> str:
    message = str(excinfo.value)
    assert "\n" not in message, f"message spans lines: {message!r}"
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} missing from {message!r}"
    return message


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


# ---- loading and overrides ------------------------------------------------------------------

def test_defaults_validate_for_a_single_process():
    cfg = load_config(None, [])
    assert cfg == Config()
    assert validate(cfg, world_size=1) is cfg


def test_partial_yaml_keeps_defaults_for_missing_keys(tmp_path):
    cfg = load_config(_write(tmp_path / "c.yaml", "moe: {top_k: 4}\n"), [])
    assert cfg.moe.top_k == 4
    assert cfg.moe.num_experts == Config().moe.num_experts
    assert cfg.train == Config().train


def test_empty_yaml_file_means_all_defaults(tmp_path):
    assert load_config(_write(tmp_path / "c.yaml", "# nothing\n"), []) == Config()


def test_overrides_beat_the_file_and_later_overrides_beat_earlier(tmp_path):
    path = _write(tmp_path / "c.yaml", "train: {steps: 100, seed: 3}\n")
    cfg = load_config(path, ["train.steps=5", "train.steps=7"])
    assert cfg.train.steps == 7
    assert cfg.train.seed == 3  # from the file, untouched by overrides


def test_override_values_are_parsed_as_yaml():
    cfg = load_config(None, [
        "router.gatepro.enabled=false", "moe.top_k=3", "router.gatepro.penalty=1e-4",
        "router.gatepro.schedule=[[0,true],[300,false]]", "moe.capacity_factor=1.25",
        "model.head_dim=null", "train.lr=1",
    ])
    assert cfg.router.gatepro.enabled is False
    assert cfg.moe.top_k == 3
    assert cfg.router.gatepro.penalty == 1e-4 and isinstance(cfg.router.gatepro.penalty, float)
    assert cfg.router.gatepro.schedule == [[0, True], [300, False]]
    assert cfg.moe.capacity_factor == 1.25
    assert cfg.model.head_dim is None
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)  # int accepted for float


def test_string_keys_keep_the_text_as_written():
    cfg = load_config(None, ["train.run_dir=007", "train.resume=auto", "data.source=[a.txt, b.bin]"])
    assert cfg.train.run_dir == "007"
    assert cfg.train.resume == "auto"
    assert cfg.data.source == ["a.txt", "b.bin"]


def test_yaml_float_without_a_dot_is_read_as_a_float(tmp_path):
    # PyYAML reads `1e-4` as the string "1e-4"; a float key must still accept it.
    cfg = load_config(_write(tmp_path / "c.yaml", "router: {gatepro: {penalty: 1e-4}}\n"), [])
    assert cfg.router.gatepro.penalty == 1e-4


# ---- load-time errors -----------------------------------------------------------------------

@pytest.mark.parametrize("text, key, suggestion", [
    ("trian: {steps: 3}\n", "trian", "train"),
    ("steps: 3\n", "steps", "train.steps"),
    ("moe: {topk: 3}\n", "moe.topk", "moe.top_k"),
    ("router: {gatepro: {penalti: 0.1}}\n", "router.gatepro.penalti", "router.gatepro.penalty"),
])
def test_unknown_yaml_key_names_the_file_and_suggests_the_nearest(tmp_path, text, key, suggestion):
    path = _write(tmp_path / "c.yaml", text)
    with pytest.raises(ConfigError) as err:
        load_config(path, [])
    _fails(err, f"'{key}'", f"did you mean '{suggestion}'?", path)


@pytest.mark.parametrize("override, key, suggestion", [
    ("moe.topk=3", "moe.topk", "moe.top_k"),
    ("top_k=3", "top_k", "moe.top_k"),
    ("router.gatepro.penalti=0.1", "router.gatepro.penalti", "router.gatepro.penalty"),
    ("trian.steps=3", "trian.steps", "train.steps"),
])
def test_unknown_override_key_suggests_the_nearest(override, key, suggestion):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    _fails(err, f"'{key}'", f"did you mean '{suggestion}'?")


def test_override_without_equals_sign_is_rejected():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["train.steps"])
    _fails(err, "train.steps", "key=value")


def test_override_naming_a_section_is_rejected():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["router.gatepro=false"])
    _fails(err, "router.gatepro", "section")


def test_section_given_a_scalar_in_yaml_is_rejected(tmp_path):
    path = _write(tmp_path / "c.yaml", "moe: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, [])
    _fails(err, "moe", "mapping", path)


@pytest.mark.parametrize("override, key", [
    ("moe.top_k=abc", "moe.top_k"),
    ("train.steps=1.5", "train.steps"),
    ("train.steps=true", "train.steps"),       # bool is not an int
    ("model.qk_norm=3", "model.qk_norm"),
    ("train.lr=fast", "train.lr"),
    ("train.lr=true", "train.lr"),             # bool is not a float either
    ("model.head_dim=1.5", "model.head_dim"),
    ("train.run_dir=null", "train.run_dir"),
    ("data.source=[1, 2]", "data.source"),
    ("router.gatepro.schedule=5", "router.gatepro.schedule"),
])
def test_wrong_type_is_rejected(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    _fails(err, key, "expected")


def test_wrong_type_in_yaml_names_the_file(tmp_path):
    path = _write(tmp_path / "c.yaml", "train: {steps: many}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, [])
    _fails(err, "train.steps", "expected int", path)


@pytest.mark.parametrize("override, key", [
    ("moe.drop_policy=random", "moe.drop_policy"),
    ("train.dtype=fp16", "train.dtype"),
    ("train.backend=megatron", "train.backend"),
    ("parallel.backend=mpi", "parallel.backend"),
    ("train.nan_policy=ignore", "train.nan_policy"),
    ("data.bin_dtype=int8", "data.bin_dtype"),
])
def test_value_outside_its_choices_is_rejected(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    _fails(err, key, "choose one of")


@pytest.mark.parametrize("schedule", [
    "[[0, 1]]",            # on/off must be a bool
    "[[true, true]]",      # step must be an int, not a bool
    "[[0.5, true]]",
    "[[0]]",
    "[0, true]",           # not a list of pairs
    "[[0, true, 1]]",
])
def test_schedule_entry_that_is_not_step_and_bool_is_rejected(schedule):
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"router.gatepro.schedule={schedule}"])
    _fails(err, "router.gatepro.schedule", "[int, bool]")


def test_missing_yaml_file_is_named(tmp_path):
    path = str(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError) as err:
        load_config(path, [])
    _fails(err, path, "does not exist")


def test_yaml_that_is_not_a_mapping_is_named(tmp_path):
    path = _write(tmp_path / "c.yaml", "- a\n- b\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, [])
    _fails(err, path, "mapping")


def test_invalid_yaml_syntax_is_named_with_its_line(tmp_path):
    path = _write(tmp_path / "c.yaml", "train:\n  steps: [1, 2\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, [])
    _fails(err, path, "not valid YAML", "line")


# ---- validation -----------------------------------------------------------------------------

def _validate(overrides: list[str], world_size: int = 2) -> None:
    validate(load_config(None, overrides), world_size=world_size)


@pytest.mark.parametrize("override, key", [
    ("model.vocab_size=0", "model.vocab_size"),
    ("model.d_model=-8", "model.d_model"),
    ("model.n_layers=0", "model.n_layers"),
    ("model.n_heads=0", "model.n_heads"),
    ("model.head_dim=0", "model.head_dim"),
    ("model.max_seq_len=0", "model.max_seq_len"),
    ("model.dense_ffn_dim=0", "model.dense_ffn_dim"),
    ("model.moe_every=0", "model.moe_every"),
    ("moe.num_experts=0", "moe.num_experts"),
    ("moe.expert_ffn_dim=0", "moe.expert_ffn_dim"),
    ("moe.shared_expert_ffn_dim=0", "moe.shared_expert_ffn_dim"),
    ("parallel.ep=0", "parallel.ep"),
    ("data.seq_len=0", "data.seq_len"),
    ("data.max_bytes=0", "data.max_bytes"),
    ("train.steps=0", "train.steps"),
    ("train.global_batch_size=0", "train.global_batch_size"),
    ("train.grad_accum=0", "train.grad_accum"),
    ("train.eval_every=0", "train.eval_every"),
    ("train.lr=0", "train.lr"),
    ("train.lr=-1e-3", "train.lr"),
    ("moe.capacity_factor=0", "moe.capacity_factor"),
    ("moe.capacity_factor=-1.0", "moe.capacity_factor"),
])
def test_non_positive_size_or_rate_is_rejected(override, key):
    with pytest.raises(ConfigError) as err:
        _validate([override])
    _fails(err, key, "> 0")


@pytest.mark.parametrize("override, key", [
    ("train.seed=-1", "train.seed"),
    ("train.weight_decay=-0.1", "train.weight_decay"),
    ("router.aux_loss_coef=-0.01", "router.aux_loss_coef"),
    ("moe.num_shared_experts=-1", "moe.num_shared_experts"),
    ("model.first_dense_layers=-1", "model.first_dense_layers"),
])
def test_negative_count_or_coefficient_is_rejected(override, key):
    with pytest.raises(ConfigError) as err:
        _validate([override])
    _fails(err, key, ">= 0")


@pytest.mark.parametrize("top_k", [0, 17])
def test_top_k_outside_one_to_num_experts_is_rejected(top_k):
    with pytest.raises(ConfigError) as err:
        _validate([f"moe.top_k={top_k}", "moe.num_experts=16"])
    _fails(err, "moe.top_k", "moe.num_experts=16")


def test_top_k_equal_to_num_experts_is_allowed():
    _validate(["moe.top_k=16", "moe.num_experts=16"])


def test_negative_gatepro_penalty_is_rejected():
    with pytest.raises(ConfigError) as err:
        _validate(["router.gatepro.penalty=-1e-4"])
    _fails(err, "router.gatepro.penalty", ">= 0")


@pytest.mark.parametrize("value", ["nan", "inf", ".nan", ".inf", "-.inf"])
def test_non_finite_gatepro_penalty_is_rejected(value):
    with pytest.raises(ConfigError) as err:
        _validate([f"router.gatepro.penalty={value}"])
    _fails(err, "router.gatepro.penalty", "finite")


def test_non_finite_penalty_set_in_code_is_rejected_too():
    cfg = Config()
    cfg.router.gatepro.penalty = math.nan
    with pytest.raises(ConfigError) as err:
        validate(cfg, world_size=1)
    _fails(err, "router.gatepro.penalty", "finite")


def test_wrong_type_set_in_code_is_rejected_by_validate():
    cfg = Config()
    cfg.moe.top_k = "2"
    with pytest.raises(ConfigError) as err:
        validate(cfg, world_size=1)
    _fails(err, "moe.top_k", "expected int")


def test_num_experts_not_divisible_by_ep_is_rejected():
    with pytest.raises(ConfigError) as err:
        _validate(["moe.num_experts=15", "parallel.ep=2"], world_size=2)
    _fails(err, "moe.num_experts", "parallel.ep=2")


@pytest.mark.parametrize("ep, world_size", [(4, 2), (2, 3)])
def test_ep_not_dividing_world_size_is_rejected(ep, world_size):
    with pytest.raises(ConfigError) as err:
        _validate([f"parallel.ep={ep}", "train.global_batch_size=12"], world_size=world_size)
    _fails(err, "parallel.ep", f"world size {world_size}")


def test_ep_dividing_world_size_is_allowed():
    _validate(["parallel.ep=2", "train.global_batch_size=16"], world_size=4)


@pytest.mark.parametrize("world_size, grad_accum", [(3, 1), (2, 3)])
def test_global_batch_not_divisible_by_world_times_accum_is_rejected(world_size, grad_accum):
    with pytest.raises(ConfigError) as err:
        _validate(["train.global_batch_size=16", f"train.grad_accum={grad_accum}"], world_size=world_size)
    _fails(err, "train.global_batch_size", "train.grad_accum")


def test_micro_batch_size_splits_the_global_batch():
    cfg = load_config(None, ["train.global_batch_size=16", "train.grad_accum=2"])
    assert cfg.train.micro_batch_size(world_size=4) == 2


def test_n_heads_not_divisible_by_n_kv_heads_is_rejected():
    with pytest.raises(ConfigError) as err:
        _validate(["model.n_heads=4", "model.n_kv_heads=3"])
    _fails(err, "model.n_kv_heads", "model.n_heads=4")


def test_d_model_not_divisible_by_n_heads_is_rejected_unless_head_dim_is_set():
    with pytest.raises(ConfigError) as err:
        _validate(["model.d_model=130", "model.n_heads=4", "model.n_kv_heads=2"])
    _fails(err, "model.d_model", "model.head_dim")
    _validate(["model.d_model=130", "model.n_heads=4", "model.n_kv_heads=2", "model.head_dim=32"])


def test_odd_head_dim_is_rejected_because_rope_rotates_pairs():
    with pytest.raises(ConfigError) as err:
        _validate(["model.head_dim=33"])
    _fails(err, "model.head_dim", "even")


def test_more_dense_layers_than_layers_is_rejected():
    with pytest.raises(ConfigError) as err:
        _validate(["model.n_layers=4", "model.first_dense_layers=5"])
    _fails(err, "model.first_dense_layers", "model.n_layers=4")


def test_seq_len_beyond_max_seq_len_is_rejected():
    with pytest.raises(ConfigError) as err:
        _validate(["data.seq_len=1024", "model.max_seq_len=512"])
    _fails(err, "data.seq_len", "model.max_seq_len")


@pytest.mark.parametrize("schedule, problem", [
    ("[[-1, true]]", "negative"),
    ("[[10, true], [10, false]]", "strictly increasing"),
    ("[[10, true], [5, false]]", "strictly increasing"),
])
def test_schedule_with_negative_or_non_increasing_steps_is_rejected(schedule, problem):
    with pytest.raises(ConfigError) as err:
        _validate([f"router.gatepro.schedule={schedule}"])
    _fails(err, "router.gatepro.schedule", problem)


def test_gatepro_with_a_single_expert_is_rejected():
    with pytest.raises(ConfigError) as err:
        _validate(["moe.num_experts=1", "moe.top_k=1"], world_size=1)
    _fails(err, "moe.num_experts", "router.gatepro.enabled=false")
    _validate(["moe.num_experts=1", "moe.top_k=1", "router.gatepro.enabled=false"], world_size=1)


@pytest.mark.parametrize("value", ["0", "0.0", "0.6", "1"])
def test_val_fraction_outside_zero_to_half_is_rejected(value):
    with pytest.raises(ConfigError) as err:
        _validate([f"data.val_fraction={value}"])
    _fails(err, "data.val_fraction", "(0.0, 0.5]")


def test_val_fraction_of_one_half_is_allowed():
    _validate(["data.val_fraction=0.5"])


@pytest.mark.parametrize("override, key", [
    ("train.beta2=1.0", "train.beta2"), ("train.beta1=-0.1", "train.beta1"),
    ("train.min_lr_ratio=1.5", "train.min_lr_ratio"),
])
def test_optimizer_coefficient_outside_its_range_is_rejected(override, key):
    with pytest.raises(ConfigError) as err:
        _validate([override])
    _fails(err, key, "outside")


def test_short_runs_keep_the_default_warmup():
    # A quick `train.steps=10` trial must not trip over the default warmup.
    _validate(["train.steps=10", "train.warmup_steps=30"])


def test_run_dir_that_is_a_file_is_rejected(tmp_path):
    (tmp_path / "out").write_text("")
    with pytest.raises(ConfigError) as err:
        _validate([f"train.run_dir={tmp_path / 'out'}"])
    _fails(err, "train.run_dir", "is a file")


def test_run_dir_under_a_file_is_rejected(tmp_path):
    (tmp_path / "out").write_text("")
    with pytest.raises(ConfigError) as err:
        _validate([f"train.run_dir={tmp_path / 'out' / 'run'}"])
    _fails(err, "train.run_dir", "which is a file")


def test_run_dir_whose_existing_parent_is_not_writable_is_rejected(tmp_path, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):  # root ignores permission bits: refuse writes explicitly
            real_access = os.access
            monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == locked else real_access(p, mode))
        with pytest.raises(ConfigError) as err:
            _validate([f"train.run_dir={locked / 'a' / 'b'}"])
        _fails(err, "train.run_dir", "not writable", str(locked))
    finally:
        locked.chmod(0o700)


def test_validation_creates_nothing(tmp_path):
    before = sorted(tmp_path.rglob("*"))
    _validate(["train.run_dir=runs/x"])  # relative: under the (scratch) working directory
    _validate([f"train.run_dir={tmp_path / 'a' / 'b' / 'c'}"])
    assert sorted(tmp_path.rglob("*")) == before


def test_resume_is_free_form_but_a_path_must_exist(tmp_path):
    _validate(["train.resume=none"])
    _validate(["train.resume=auto"])
    (tmp_path / "ckpt").mkdir()
    _validate([f"train.resume={tmp_path / 'ckpt'}"])
    with pytest.raises(ConfigError) as err:
        _validate([f"train.resume={tmp_path / 'missing'}"])
    _fails(err, "train.resume", "'auto'")


def test_data_source_path_must_exist(tmp_path):
    (tmp_path / "corpus.txt").write_text("hello")
    _validate([f"data.source={tmp_path / 'corpus.txt'}"])
    _validate([f"data.source=[stdlib, {tmp_path / 'corpus.txt'}]"])
    with pytest.raises(ConfigError) as err:
        _validate([f"data.source={tmp_path / 'missing.txt'}"])
    _fails(err, "data.source", "stdlib")
    with pytest.raises(ConfigError) as err:
        _validate(["data.source=[]"])
    _fails(err, "data.source", "empty")


def test_bad_world_size_is_rejected():
    with pytest.raises(ConfigError) as err:
        validate(Config(), world_size=0)
    _fails(err, "world_size", "WORLD_SIZE")


# ---- resolved config, hashing, schedule -----------------------------------------------------

def _unusual() -> Config:
    return load_config(None, [
        "model.head_dim=32", "moe.capacity_factor=1.5", "moe.drop_policy=probs",
        "router.gatepro.penalty=3e-4", "router.gatepro.schedule=[[0, true], [300, false]]",
        "data.source=[stdlib, x.bin]", "train.dtype=bf16", "train.run_dir=007", "train.lr=1e-5",
    ])


def test_to_yaml_then_load_gives_an_equal_config(tmp_path):
    cfg = _unusual()
    path = _write(tmp_path / "resolved.yaml", cfg.to_yaml())
    assert load_config(path, []) == cfg
    assert config_from_dict(cfg.to_dict()) == cfg


def test_to_dict_covers_every_key():
    flat = []

    def walk(d, prefix=""):
        for k, v in d.items():
            walk(v, f"{prefix}{k}.") if isinstance(v, dict) else flat.append(prefix + k)

    walk(Config().to_dict())
    assert flat == all_keys()


def test_config_hash_is_stable_and_short():
    assert config_hash(_unusual()) == config_hash(_unusual())
    digest = config_hash(Config())
    assert len(digest) == 12 and int(digest, 16) >= 0


def test_config_hash_ignores_run_length_location_and_logging_cadence():
    base = config_hash(Config())
    for override in ["train.steps=3000", "train.resume=auto", "train.run_dir=elsewhere",
                     "train.log_every=7", "train.eval_every=9", "train.save_every=11",
                     "train.stats_every=13", "train.progress=false"]:
        assert config_hash(load_config(None, [override])) == base, override
    assert {"train.steps", "train.resume", "train.run_dir"} <= set(HASH_EXCLUDED_KEYS)
    assert set(HASH_EXCLUDED_KEYS) <= set(all_keys())


@pytest.mark.parametrize("override", [
    "router.gatepro.penalty=2e-4", "moe.top_k=3", "train.seed=1", "parallel.ep=2",
    "router.gatepro.schedule=[[0, true], [300, false]]", "train.lr=1e-3",
])
def test_config_hash_changes_with_anything_that_changes_the_numbers(override):
    assert config_hash(load_config(None, [override])) != config_hash(Config())


def test_gatepro_without_schedule_follows_enabled_at_every_step():
    assert all(gatepro_enabled_at(GateProConfig(enabled=True), s) for s in (0, 1, 10**9))
    assert not any(gatepro_enabled_at(GateProConfig(enabled=False), s) for s in (0, 1, 10**9))


def test_gatepro_schedule_switches_at_the_listed_steps():
    gatepro = GateProConfig(enabled=True, schedule=[[0, True], [300, False]])
    assert [gatepro.enabled_at(s) for s in (0, 299, 300, 5000)] == [True, True, False, False]
    later = GateProConfig(enabled=False, schedule=[[100, True], [200, False], [400, True]])
    assert [gatepro_enabled_at(later, s) for s in (0, 99, 100, 199, 200, 399, 400)] == [
        False, False, True, True, False, False, True]  # `enabled` holds before the first entry


def test_moe_layer_placement():
    cfg = load_config(None, ["model.n_layers=6", "model.first_dense_layers=1", "model.moe_every=2"])
    assert [i for i in range(6) if cfg.model.is_moe_layer(i)] == [1, 3, 5]
    assert all(Config().model.is_moe_layer(i) for i in range(4))


def test_help_text_lists_every_key_with_type_and_default():
    lines = help_text().splitlines()
    assert [line.split()[0] for line in lines] == all_keys()
    assert any(line.startswith("router.gatepro.penalty") and "float" in line and "0.0001" in line
               for line in lines)


# ---- the shipped configs --------------------------------------------------------------------

@pytest.mark.parametrize("name", ["quickstart.yaml", "baseline.yaml"])
def test_shipped_config_loads_and_validates_on_two_ranks(name):
    cfg = load_config(str(CONFIGS / name), [])
    validate(cfg, world_size=2)
    assert (cfg.model.d_model, cfg.model.n_layers, cfg.model.n_heads, cfg.model.n_kv_heads) == (128, 4, 4, 2)
    assert (cfg.moe.num_experts, cfg.moe.top_k, cfg.moe.expert_ffn_dim) == (16, 2, 256)
    assert (cfg.data.seq_len, cfg.train.global_batch_size, cfg.train.steps) == (128, 16, 300)
    assert (cfg.parallel.ep, cfg.router.gatepro.penalty, cfg.train.eval_every) == (2, 1e-4, 50)


def test_baseline_differs_from_quickstart_only_by_gatepro_and_run_dir():
    quick = load_config(str(CONFIGS / "quickstart.yaml"), [])
    base = load_config(str(CONFIGS / "baseline.yaml"), [])
    assert quick.router.gatepro.enabled and not base.router.gatepro.enabled
    assert (quick.train.run_dir, base.train.run_dir) == ("runs/quickstart", "runs/baseline")
    base.router.gatepro.enabled, base.train.run_dir = True, "runs/quickstart"
    assert base == quick
