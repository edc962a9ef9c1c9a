"""`analyze_adapter` on adapters saved from tiny models: ΔW and W checked against the merged weights (the
update lorakit's merge writes, layout included: GPT-2's Conv1D stores (in × out)) and a dense float64 SVD;
comparisons of planted A's; every mismatch refused with a clear ValueError; the files it writes."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import lorakit
from lorakit.analysis import write_report
from support.models import randomize_lora


def _save(model, folder, base=None, **config):
    lorakit.add_adapter(model, lorakit.LoraConfig(**config))
    randomize_lora(model)
    lorakit.save_adapter(model, folder, base_model_name_or_path=base)
    return model


def _merged_deltas(adapted) -> dict[str, torch.Tensor]:
    """ΔW per adapted module in (out × in) layout, from the weights merge writes (an independent route)."""
    before = {n: p.detach().clone() for n, p in adapted.named_parameters() if n.endswith("base_layer.weight")}
    lorakit.merge(adapted)
    deltas = {}
    for name, old in before.items():
        new = adapted.get_parameter(name).detach()
        conv1d = type(adapted.get_submodule(name.removesuffix(".weight"))).__name__ == "Conv1D"
        delta = (new - old).double()
        deltas[name.removesuffix(".base_layer.weight")] = delta.T if conv1d else delta
    lorakit.unmerge(adapted)
    return deltas


def _reference_row(delta: torch.Tensor, weight: torch.Tensor, r: int) -> dict[str, float]:
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    core = u[:, :r].T @ weight @ vh[:r].T
    return {
        "s": s[:r],
        "delta_norm": float(delta.norm()),
        "weight_norm": float(weight.norm()),
        "projection_delta": float(core.norm()),
        "projection_weight": float(torch.linalg.svdvals(weight)[:r].norm()),
    }


@pytest.mark.parametrize(
    "key,targets,rslora", [("gpt2", ["c_attn", "c_proj"], False), ("llama", ["q_proj", "down_proj"], True)]
)
def test_rows_match_merged_update_and_base_weight(base_copy, tmp_path, key, targets, rslora):
    adapted = _save(base_copy(key), tmp_path / "a", r=3, alpha=5, target_modules=targets, use_rslora=rslora)
    deltas = _merged_deltas(adapted)
    base = base_copy(key)
    report = lorakit.analyze_adapter(tmp_path / "a", model=base)
    assert [row["module"] for row in report["layers"]] == sorted(deltas, key=lambda p: (p.split(".", 3)[-1], p))
    for row in report["layers"]:
        module = base.get_submodule(row["module"])
        weight = module.weight.detach().double()
        weight = weight.T if type(module).__name__ == "Conv1D" else weight
        expected = _reference_row(deltas[row["module"]], weight, 3)
        assert row["rank"] == 3 and row["scaling"] == pytest.approx(5 / 3**0.5 if rslora else 5 / 3)
        torch.testing.assert_close(
            torch.tensor(row["singular_values"], dtype=torch.float64), expected["s"], rtol=1e-4, atol=1e-6
        )
        for field in ("delta_norm", "weight_norm", "projection_delta", "projection_weight"):
            assert row[field] == pytest.approx(expected[field], rel=1e-4), field
        assert row["relative_norm"] == pytest.approx(expected["delta_norm"] / expected["weight_norm"], rel=1e-4)
        assert row["amplification"] == pytest.approx(expected["delta_norm"] / expected["projection_delta"], rel=1e-4)
        assert 0 < row["projection_random"] < expected["weight_norm"]
    assert report["base_model"] == type(base).__name__ and report["skipped"] == []


def _set_a(folder, rows_for_layer):
    """Rewrite the lora_A tensors of a saved adapter: rows_for_layer(path) gives the new (r × in) A."""
    from safetensors.torch import load_file, save_file

    file = folder / "adapter_model.safetensors"
    tensors = load_file(file)
    for key in tensors:
        if key.endswith("lora_A.weight"):
            tensors[key] = rows_for_layer(key, tensors[key]).contiguous()
    save_file(tensors, file)


def test_comparison_of_planted_adapters(base_copy, tmp_path):
    config = dict(target_modules=["q_proj", "v_proj"], alpha=4)
    _save(base_copy("llama"), tmp_path / "small", r=2, **config)
    _save(base_copy("llama"), tmp_path / "large", r=4, **config)
    eye = torch.eye(16)
    # In order of decreasing singular value, small reads e0, e1; large reads e1, e8, e0, e9 (q_proj) or
    # e4..e7 (v_proj).
    _set_a(tmp_path / "small", lambda key, a: torch.diag(torch.tensor([2.0, 1.0])) @ eye[:2])
    _set_a(
        tmp_path / "large",
        lambda key, a: (
            torch.diag(torch.tensor([4.0, 3.0, 2.0, 1.0])) @ (eye[[1, 8, 0, 9]] if "q_proj" in key else eye[4:8])
        ),
    )
    report = lorakit.analyze_adapter(tmp_path / "small", compare=tmp_path / "large", with_base=False)
    assert report["base_model"] is None and "weight_norm" not in report["layers"][0]
    rows = {row["module"].split(".", 2)[-1]: row for row in report["comparison"]["layers"]}
    assert set(rows) == {"0.self_attn.q_proj", "1.self_attn.q_proj", "0.self_attn.v_proj", "1.self_attn.v_proj"}
    q, v = rows["0.self_attn.q_proj"], rows["1.self_attn.v_proj"]
    # φ(i, j) = |{e0, e1}[:i] ∩ {e1, e8, e0, e9}[:j]| / min(i, j)
    torch.testing.assert_close(torch.tensor(q["phi"]), torch.tensor([[0.0, 0.0, 1.0, 1.0], [1.0, 0.5, 1.0, 1.0]]))
    assert (q["r1"], q["r2"], q["dim"]) == (2, 4, 16)
    assert (q["phi_1_1"], q["phi_k_k"], q["phi_r1_r2"]) == pytest.approx((0.0, 0.5, 1.0))
    assert q["random_r1_r2"] == pytest.approx(4 / 16)
    assert max(max(line) for line in v["phi"]) < 1e-6


def test_b_side_comparison_of_identical_adapters(base_copy, tmp_path):
    _save(base_copy("gpt2"), tmp_path / "one", r=2, target_modules=["c_attn"])
    report = lorakit.analyze_adapter(tmp_path / "one", compare=tmp_path / "one", factor="B", with_base=False)
    for row in report["comparison"]["layers"]:
        assert row["dim"] == 48  # c_attn's output side
        torch.testing.assert_close(torch.tensor(row["phi"]), torch.ones(2, 2))


def test_mismatched_or_unsupported_adapters_are_refused(base_copy, tmp_path):
    _save(base_copy("llama"), tmp_path / "qv", r=2, target_modules=["q_proj", "v_proj"], base="tiny-llama")
    _save(base_copy("llama"), tmp_path / "q", r=2, target_modules=["q_proj"], base="tiny-llama")
    _save(base_copy("llama"), tmp_path / "other_base", r=2, target_modules=["q_proj", "v_proj"], base="another")
    _save(base_copy("llama"), tmp_path / "dora", r=2, target_modules=["q_proj"], use_dora=True)
    _save(base_copy("llama"), tmp_path / "nobase", r=2, target_modules=["q_proj"])
    with pytest.raises(ValueError, match=r"adapt different modules: only in .*qv: \['model.layers.0.self_attn.v_proj'"):
        lorakit.analyze_adapter(tmp_path / "qv", compare=tmp_path / "q", with_base=False)
    with pytest.raises(ValueError, match="different base models"):
        lorakit.analyze_adapter(tmp_path / "qv", compare=tmp_path / "other_base", with_base=False)
    with pytest.raises(ValueError, match="DoRA"):
        lorakit.analyze_adapter(tmp_path / "dora", with_base=False)
    with pytest.raises(ValueError, match="does not name its base model"):
        lorakit.analyze_adapter(tmp_path / "nobase")
    with pytest.raises(ValueError, match="has no module 'model.layers.0.self_attn.q_proj'"):
        lorakit.analyze_adapter(tmp_path / "q", model=base_copy("gpt2"))
    with pytest.raises(ValueError, match="factor must be one of"):
        lorakit.analyze_adapter(tmp_path / "q", factor="C", with_base=False)
    with pytest.raises(ValueError, match="no adapter folder"):
        lorakit.analyze_adapter(tmp_path / "missing", with_base=False)


def test_wrong_base_shape_and_merged_base_are_refused(base_copy, tmp_path):
    from support.models import make_llama

    _save(base_copy("llama"), tmp_path / "q", r=2, target_modules=["q_proj"])
    with pytest.raises(ValueError, match=r"ΔW is 16 × 16 but the base weight is 32 × 32"):
        lorakit.analyze_adapter(tmp_path / "q", model=make_llama(hidden=32))
    merged = base_copy("llama")
    lorakit.load_adapter(merged, tmp_path / "q")
    lorakit.merge(merged)
    with pytest.raises(ValueError, match="merged adapters"):
        lorakit.analyze_adapter(tmp_path / "q", model=merged)
    lorakit.unmerge(merged)  # a model carrying the adapter unmerged gives the plain base's answer
    expected = lorakit.analyze_adapter(tmp_path / "q", model=base_copy("llama"))["layers"]
    got = lorakit.analyze_adapter(tmp_path / "q", model=merged)["layers"]
    for field in ("weight_norm", "projection_delta", "projection_weight", "projection_random"):
        assert [row[field] for row in got] == pytest.approx([row[field] for row in expected], rel=1e-5), field


def test_embedding_adapters_are_listed_as_skipped(base_copy, tmp_path):
    _save(base_copy("llama"), tmp_path / "emb", r=2, target_modules=["q_proj", "embed_tokens"])
    report = lorakit.analyze_adapter(tmp_path / "emb", with_base=False)
    assert report["skipped"] == ["model.embed_tokens"]
    assert all("q_proj" in row["module"] for row in report["layers"])
    _save(base_copy("llama"), tmp_path / "only_emb", r=2, target_modules=["embed_tokens"])
    with pytest.raises(ValueError, match="adapts no linear layer"):
        lorakit.analyze_adapter(tmp_path / "only_emb", with_base=False)


def test_write_report_files(base_copy, tmp_path):
    _save(base_copy("llama"), tmp_path / "a", r=2, target_modules=["q_proj", "v_proj"])
    _save(base_copy("llama"), tmp_path / "b", r=4, target_modules=["q_proj", "v_proj"])
    report = lorakit.analyze_adapter(tmp_path / "a", model=base_copy("llama"), compare=tmp_path / "b")
    written = write_report(report, tmp_path / "out")
    names = sorted(p.name for p in written)
    assert names == [
        "analysis.json",
        "analysis.md",
        "spectrum.png",
        "subspace_self_attn_q_proj.png",
        "subspace_self_attn_v_proj.png",
    ]
    for path in written:
        if path.suffix == ".png":
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    assert json.loads((tmp_path / "out" / "analysis.json").read_text()) == json.loads(json.dumps(report))
    text = (tmp_path / "out" / "analysis.md").read_text()
    table_rows = [line for line in text.splitlines() if line.startswith(("| 0 self_attn", "| 1 self_attn"))]
    assert len(table_rows) == 8  # 4 layers in the ΔW table, 4 in the comparison
    assert "amplification" in text and "Subspace similarity with `b`" in text
    assert not list((tmp_path / "out").glob(".*"))  # no temporary files left
    again = copy.deepcopy(report)
    again["layers"][0]["effective_rank"] = 1.5
    write_report(again, tmp_path / "out")  # rewriting replaces the files
    assert json.loads((tmp_path / "out" / "analysis.json").read_text())["layers"][0]["effective_rank"] == 1.5
