"""DISeL adapters with tensor parallelism (2 CPU worker processes): the column-parallel layers (q/k/v, gate/up) split
B by output, the row-parallel ones (o, down) split A and the gate by input and sum the partial projections before the
gate. The tokens and log-probabilities must equal PEFT's as with one process."""

import os

import pytest
from conftest import ENGINE_ARGS
from test_engine import ADAPTERS, check_row, generate


pytestmark = [
    pytest.mark.timeout(900),
    pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="tensor_parallel_size=2 needs 2 CPU cores"),
]


@pytest.fixture(scope="module")
def llm(reference_dir):
    from vllm import LLM

    cores = sorted(os.sched_getaffinity(0))[:2]
    # vLLM's CPU workers bind their threads; on one NUMA node they must be given a core each
    bind = "VLLM_CPU_OMP_THREADS_BIND" not in os.environ
    if bind:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = f"{cores[0]}|{cores[1]}"
    engine = LLM(
        model=str(reference_dir / "base"),
        **ENGINE_ARGS,
        tensor_parallel_size=2,
        distributed_executor_backend="mp",
    )
    yield engine
    engine.llm_engine.engine_core.shutdown()
    if bind:
        del os.environ["VLLM_CPU_OMP_THREADS_BIND"]


@pytest.fixture(scope="module")
def requests(reference_dir):
    from vllm.lora.request import LoRARequest

    return {name: LoRARequest(name, i + 1, str(reference_dir / name)) for i, name in enumerate(ADAPTERS)}


def test_tensor_parallel_equals_peft(llm, reference, requests):
    for name in ["disel_a", "disel_b", "disel_c"]:
        results = generate(llm, reference, requests, [(i, name) for i in range(len(reference["prompts"]))])
        for i, (result, expected) in enumerate(zip(results, reference["outputs"][name])):
            check_row(result, expected, f"TP=2, {name}, prompt {i}")
    rows = [(0, "disel_a"), (0, "disel_b"), (3, "lora"), (0, "base"), (2, "disel_a")]
    for (i, name), result in zip(rows, generate(llm, reference, requests, rows)):
        check_row(result, reference["outputs"][name][i], f"TP=2, {name}, prompt {i} in a mixed batch")
