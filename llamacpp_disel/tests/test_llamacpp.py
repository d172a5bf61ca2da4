"""DISeL adapters in llama.cpp (GGUF) through llama-cpp-python: the same tokens and logits as PEFT + transformers.

The base model is a float32 GGUF and the adapters float32 GGUF files, so the two sides compute the same function in
float32 with different kernels (ggml's mat-muls, RoPE and RMSNorm against torch's); their logits differ by rounding
only. LOGIT_TOL bounds that difference; the gates-forced-open control shows that it is far below what the gates change.
"""

import json
import shutil
import sys

import fixtures
import numpy as np
import pytest
from conftest import LLAMA_CPP, NEW_TOKENS, LlamaRunner, convert_adapter, peft_greedy, peft_logits


# Max |logit difference| allowed on sequences of the test prompts plus 8 greedy tokens, with logits of magnitude ~10
# (lm_head x 8), float32 weights and a float32 KV cache: rounding in different kernel orders gives ~1e-5 here (with
# llama.cpp's default float16 KV cache it is ~1.6e-2, the tokens still the same)
LOGIT_TOL = 1e-4
DISEL = [name for name, (_, disel, _) in fixtures.ADAPTERS.items() if disel is not None]


def compare(work, prompts, adapters: list[tuple[str, float]], open_gates: bool = False):
    """(PEFT tokens, llama.cpp tokens, max |logit difference|) on each prompt. The logits are compared on the same
    sequence on both sides: the prompt and PEFT's greedy continuation."""
    model = fixtures.load_peft(work / "base", [work / name for name, _ in adapters], open_gates=open_gates)
    if any(scale != 1.0 for _, scale in adapters):
        from peft.tuners.lora import LoraLayer

        for module in model.modules():
            if isinstance(module, LoraLayer):
                for i, (_, scale) in enumerate(adapters):
                    module.set_scale(f"a{i}", scale)
    runner = LlamaRunner(work / "base.gguf", [(work / f"{name}.gguf", scale) for name, scale in adapters])
    try:
        rows = []
        for ids in prompts:
            ref = peft_greedy(model, ids)
            got = runner.greedy(ids)
            seq = ids + ref
            diff = np.abs(peft_logits(model, seq) - runner.logits(seq)).max()
            rows.append((ref, got, float(diff)))
        return rows
    finally:
        runner.close()


def agreement(rows) -> list[int]:
    """Per prompt, how many leading generated tokens agree."""
    counts = []
    for ref, got, _ in rows:
        n = 0
        while n < len(ref) and n < len(got) and ref[n] == got[n]:
            n += 1
        counts.append(n)
    return counts


@pytest.mark.parametrize("name", list(fixtures.ADAPTERS))
def test_same_tokens_and_logits_as_peft(work, prompts, name):
    rows = compare(work, prompts, [(name, 1.0)])
    counts, max_diff = agreement(rows), max(diff for *_, diff in rows)
    print(f"\n{name}: tokens agreeing per prompt {counts} of {NEW_TOKENS}; max |logit diff| {max_diff:.2e}")
    assert counts == [NEW_TOKENS] * len(prompts), rows
    assert max_diff < LOGIT_TOL, rows


def test_two_adapters_at_once_with_their_scales(work, prompts):
    """llama.cpp sums the updates of the adapters set on a context, each with its scale; PEFT with both adapters
    active and `set_scale` computes the same."""
    rows = compare(work, prompts, [("disel_full", 0.5), ("lora", 1.0)])
    counts, max_diff = agreement(rows), max(diff for *_, diff in rows)
    print(f"\ndisel_full x0.5 + lora: tokens agreeing {counts}; max |logit diff| {max_diff:.2e}")
    assert counts == [NEW_TOKENS] * len(prompts), rows
    assert max_diff < LOGIT_TOL, rows


@pytest.mark.parametrize("name", ["disel_full", "disel_bottleneck"])
def test_gates_forced_open_do_not_match(work, prompts, name):
    """The control: PEFT with the adapter's gates forced open (a plain LoRA update) against llama.cpp with the DISeL
    adapter. If llama.cpp ignored the gates, this would match."""
    rows = compare(work, prompts, [(name, 1.0)], open_gates=True)
    counts, max_diff = agreement(rows), max(diff for *_, diff in rows)
    print(f"\n{name} gates forced open: tokens agreeing {counts}; max |logit diff| {max_diff:.2e}")
    assert max_diff > 100 * LOGIT_TOL
    assert counts != [NEW_TOKENS] * len(prompts)


def test_plain_lora_converts_as_before(work, tmp_path):
    """A plain LoRA adapter gives the same GGUF file, byte for byte, with the patched and the pristine converter (it
    runs in llama.cpp as before: see test_same_tokens_and_logits_as_peft[lora])."""
    for pristine in (True, False):
        done = convert_adapter(work / "lora", work / "base", tmp_path / f"lora-{pristine}.gguf", pristine=pristine)
        assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "lora-True.gguf").read_bytes() == (tmp_path / "lora-False.gguf").read_bytes()


def test_pristine_converter_refuses_disel(work, tmp_path):
    done = convert_adapter(work / "disel_full", work / "base", tmp_path / "out.gguf", pristine=True)
    assert done.returncode != 0
    assert "Unexpected name" in done.stderr and "lora_disel_gate" in done.stderr, done.stderr[-3000:]
    assert not (tmp_path / "out.gguf").exists()


def test_converter_refuses_unknown_disel_option(work, tmp_path):
    adapter = tmp_path / "adapter"
    shutil.copytree(work / "disel_full", adapter)
    config = fixtures.adapter_config(adapter)
    config["use_disel"] = {**config["use_disel"], "gate_kind": "tanh"}
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    done = convert_adapter(adapter, work / "base", tmp_path / "out.gguf")
    assert done.returncode != 0
    assert "unknown DISeL option(s) ['gate_kind']" in done.stderr, done.stderr[-3000:]


def rewrite_gguf(src, dst, drop=(), disel_version=1):
    """A copy of the float32 adapter GGUF `src` without the tensors `drop`, with `adapter.disel.version` set to
    `disel_version` (None: no key)."""
    sys.path.insert(0, str(LLAMA_CPP / "gguf-py"))  # the vendored gguf-py, patched
    import gguf

    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(dst, arch="llama")
    writer.add_type("adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", float(reader.fields["adapter.lora.alpha"].contents()))
    if disel_version is not None:
        writer.add_uint32("adapter.disel.version", disel_version)
    for tensor in reader.tensors:
        if tensor.name not in drop:
            writer.add_tensor(tensor.name, np.array(tensor.data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize(
    "case,expected",
    [
        ("missing_gate", "'blk.0.attn_q.weight' is missing its gate tensor 'blk.0.attn_q.weight.lora_disel_gate'"),
        ("missing_bias", "'blk.0.attn_q.weight' is missing its gate tensor 'blk.0.attn_q.weight.lora_disel_bias'"),
        ("no_version", "has DISeL gate tensors, but the adapter has no 'adapter.disel.version' key"),
        ("version_2", "DISeL adapter format version 2 is not supported"),
    ],
)
def test_llama_cpp_refuses_what_it_cannot_compute(work, tmp_path, capfd, case, expected):
    drop = {
        "missing_gate": ["blk.0.attn_q.weight.lora_disel_gate"],
        "missing_bias": ["blk.0.attn_q.weight.lora_disel_bias"],
    }.get(case, [])
    version = {"no_version": None, "version_2": 2}.get(case, 1)
    rewrite_gguf(work / "disel_full.gguf", tmp_path / "bad.gguf", drop=drop, disel_version=version)
    # the untouched copy loads: the refusals below come from what was changed
    rewrite_gguf(work / "disel_full.gguf", tmp_path / "good.gguf")
    LlamaRunner(work / "base.gguf", [(tmp_path / "good.gguf", 1.0)]).close()
    capfd.readouterr()
    with pytest.raises(ValueError, match="refused"):
        LlamaRunner(work / "base.gguf", [(tmp_path / "bad.gguf", 1.0)], verbose=True)
    assert expected in capfd.readouterr().err
