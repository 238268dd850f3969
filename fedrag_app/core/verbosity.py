"""Quiet by default: the terminal shows this app's own output (answers, tables, our progress bars); library
chatter (transformers' and PEFT's FutureWarnings, the GGUF conversion's per-tensor tqdm bar, download bars,
advisory log lines) only with ``--verbose``.

Applied once per process before any library is imported; the same settings go to child processes through the
environment (``child_env``), so a `flwr run` or `fedrag-app partition` started by ``quickstart`` is quiet too.
"""

from __future__ import annotations

import logging
import os
import warnings

from fedrag_app.core import environment

VERBOSE_ENV = environment.VERBOSE
# tqdm reads TQDM_* when it is imported (the GGUF conversion's bar is a plain tqdm); the rest are the libraries' own.
_QUIET_ENV = {
    "TQDM_DISABLE": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "PYTHONWARNINGS": "ignore",
}
_LIBRARY_LOGGERS = (
    "transformers",
    "peft",
    "sentence_transformers",
    "datasets",
    "huggingface_hub",
    "torch",
    "urllib3",
    "bitsandbytes",
)


def configure(verbose: bool) -> None:
    """Set this process (and, through the environment, its children) quiet or verbose."""
    if verbose:
        os.environ[VERBOSE_ENV] = "1"
        if os.environ.get("PYTHONWARNINGS") == _QUIET_ENV["PYTHONWARNINGS"]:  # a quiet parent's, read at startup
            warnings.resetwarnings()
        for key, value in _QUIET_ENV.items():  # a quiet parent's settings must not silence a verbose child
            if os.environ.get(key) == value:
                del os.environ[key]
        return
    os.environ.pop(VERBOSE_ENV, None)
    for key, value in _QUIET_ENV.items():
        os.environ.setdefault(key, value)
    warnings.filterwarnings("ignore")  # libraries' FutureWarning/DeprecationWarning/UserWarning
    warnings.filterwarnings("default", module=r"fedrag_app(\.|$)")  # ours stay visible
    for name in _LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    import sys

    if "transformers" in sys.modules:  # imported already (tests, or a caller): its own switches
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()


def child_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: this process's) with the current verbosity for a child process."""
    out = dict(os.environ if env is None else env)
    if environment.verbose():
        out[VERBOSE_ENV] = "1"
        for key in _QUIET_ENV:
            out.pop(key, None)
    else:
        for key, value in _QUIET_ENV.items():
            out.setdefault(key, value)
    return out
