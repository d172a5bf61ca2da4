"""DISeL adapters in a vLLM engine (offline `LLM`, one engine for the module): the same greedy tokens and
log-probabilities as PEFT + transformers, several adapters in one batch, and the load-time refusals.

The engine has 3 LoRA slots (`max_loras=3`) for 4 adapters, so adapters are evicted and come back in other slots, and
the mixed batches fill every slot next to rows without an adapter.
"""

import pytest
from conftest import ENGINE_ARGS, LOGPROB_ATOL


pytestmark = pytest.mark.timeout(900)

ADAPTERS = ["disel_a", "disel_b", "disel_c", "lora"]


@pytest.fixture(scope="module")
def llm(reference_dir):
    from vllm import LLM

    engine = LLM(
        model=str(reference_dir / "base"),
        **ENGINE_ARGS,
    )
    yield engine
    engine.llm_engine.engine_core.shutdown()


@pytest.fixture(scope="module")
def requests(reference_dir):
    from vllm.lora.request import LoRARequest

    return {name: LoRARequest(name, i + 1, str(reference_dir / name)) for i, name in enumerate(ADAPTERS)}


def generate(llm, reference, requests, rows):
    """Greedy continuations of `rows` = [(prompt index, adapter name or "base"), ...] in one `generate` call."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(temperature=0.0, max_tokens=reference["new_tokens"], ignore_eos=True, logprobs=0)
    prompts = [TokensPrompt(prompt_token_ids=reference["prompt_ids"][i]) for i, _ in rows]
    loras = [None if name == "base" else requests[name] for _, name in rows]
    outputs = llm.generate(prompts, params, lora_request=loras, use_tqdm=False)
    results = []
    for out in outputs:
        completion = out.outputs[0]
        tokens = list(completion.token_ids)
        results.append((tokens, [lp[t].logprob for t, lp in zip(tokens, completion.logprobs)]))
    return results


def check_row(result, expected, what):
    tokens, logprobs = result
    assert tokens == expected["tokens"], f"{what}: vLLM {tokens} != PEFT {expected['tokens']}"
    worst = max(abs(a - b) for a, b in zip(logprobs, expected["logprobs"]))
    assert worst <= LOGPROB_ATOL, f"{what}: log-probabilities differ by {worst:.2e} > {LOGPROB_ATOL}"
    return worst


def test_each_adapter_equals_peft(llm, reference, requests):
    """Item 1: each adapter on all prompts (one batch per adapter) equals PEFT + transformers; disel_a twice, the
    second time after disel_c and lora have taken its slot."""
    worst = {}
    for name in ["base", *ADAPTERS, "disel_a"]:
        results = generate(llm, reference, requests, [(i, name) for i in range(len(reference["prompts"]))])
        worst[name] = max(
            check_row(r, e, f"{name}, prompt {i}") for i, (r, e) in enumerate(zip(results, reference["outputs"][name]))
        )
    print(f"max |logprob(vLLM) - logprob(PEFT)| per adapter: { {k: f'{v:.1e}' for k, v in worst.items()} }")
    print(f"mean gate openings (PEFT, on the prompts): { {k: round(v['mean_gate'], 3) for k, v in reference['adapters'].items() if v['use_disel']} }")  # fmt: skip
    # the gates matter: disel_a with its gates fully open (served as plain LoRA) gives other tokens
    ungated = reference["outputs"]["disel_a_ungated"]
    assert any(u["tokens"] != e["tokens"] for u, e in zip(ungated, reference["outputs"]["disel_a"]))


@pytest.mark.parametrize(
    "rows",
    [
        # item 2: a DISeL adapter, a plain LoRA adapter and no adapter in one batch
        [(0, "disel_a"), (1, "lora"), (2, "base")],
        # two DISeL adapters at once, with a plain LoRA adapter (every slot taken) and rows without an adapter
        [(0, "disel_a"), (0, "disel_b"), (3, "lora"), (0, "base"), (5, "disel_b"), (4, "base"), (2, "disel_a")],
    ],
    ids=["disel-lora-none", "two-disel-lora-none"],
)
def test_mixed_batch_rows_equal_single_runs(llm, reference, requests, rows):
    batch = generate(llm, reference, requests, rows)
    for (i, name), row in zip(rows, batch):
        single = generate(llm, reference, requests, [(i, name)])[0]
        assert row[0] == single[0], f"{name}, prompt {i}: batched {row[0]} != alone {single[0]}"
        check_row(row, reference["outputs"][name][i], f"{name}, prompt {i} in the batch")


def test_rows_without_adapter_when_the_last_slot_holds_plain_lora(llm, reference, reference_dir, requests):
    """disel_b has no LoRA on o_proj and gate_proj, so there a batch of disel_b, lora and rows without an adapter runs
    vLLM's plain LoRA path; with lora in the last slot, vLLM's CPU shrink would give the rows without an adapter
    lora's update (slot index -1 read as the last slot) unless the plugin's fix is in place."""
    from vllm.lora.request import LoRARequest

    for lora_id in llm.llm_engine.list_loras():
        llm.llm_engine.remove_lora(lora_id)
    # slots in order of activation: disel_b, a second copy of lora, lora (the last slot)
    slots = {**requests, "lora_copy": LoRARequest("lora_copy", 50, str(reference_dir / "lora"))}
    for name in ["disel_b", "lora_copy", "lora"]:
        generate(llm, reference, slots, [(0, name)])
    rows = [(1, "disel_b"), (1, "lora"), (1, "base"), (3, "base"), (2, "lora_copy")]
    expected = {**reference["outputs"], "lora_copy": reference["outputs"]["lora"]}
    for (i, name), result in zip(rows, generate(llm, reference, slots, rows)):
        check_row(result, expected[name][i], f"{name}, prompt {i}")


@pytest.mark.parametrize(
    "name, message",
    [
        ("disel_embed", "gate on the embedding layer 'model.embed_tokens'"),
        ("disel_lm_head", "gate on 'lm_head'"),
    ],
)
def test_refused_adapters_leave_the_engine_serving(llm, reference, reference_dir, requests, name, message):
    """Item 5: what the plugin does not support is refused when the adapter is loaded (`add_lora`, as `vllm serve`
    does), with the reason; the engine keeps serving."""
    from vllm.lora.request import LoRARequest

    with pytest.raises(Exception, match=message) as info:
        llm.llm_engine.add_lora(LoRARequest(name, 100 + len(name), str(reference_dir / name)))
    print(f"{name}: {info.value}")
    check_row(
        generate(llm, reference, requests, [(0, "disel_a")])[0], reference["outputs"]["disel_a"][0], "after a refusal"
    )
