"""What the library decided for a run, said once when its LR schedule is built (at ``train()`` start).

A user who asks for ``lr_scaling="legw"`` at 8x the batch should not have to reverse-engineer the peak LR, the
warm-up or the clock the schedule runs on from the logged LR curve. The summary is a plain dict
(``LargeBatchTrainer.run_summary``, for scripts and reports) and a block of ``key: value`` lines logged at INFO, as
HF logs its own "***** Running training *****" block. A warm-up that does not end before the run does is a
WARNING: the LR would never reach its peak, silently.

The package logger ``hf_largebatch`` takes the process's ``log_level`` (as HF's Trainer sets transformers'
verbosity from it) and adds no handler of its own (the Python logging HOWTO's advice for libraries): the summary
shows where logging is configured, as HF's example scripts do (``logging.basicConfig``), with ``log_level="info"``.
"""

from __future__ import annotations

import logging

LIBRARY_LOGGER = "hf_largebatch"


def follow_process_log_level(level: int) -> None:
    logging.getLogger(LIBRARY_LOGGER).setLevel(level)


def summary_lines(summary: dict) -> list[str]:
    """``key: value`` per decision, one ``algorithm name: settings`` line per algorithm (the log and the run
    report show the same lines)."""
    lines = []
    for key, value in summary.items():
        if key == "algorithms":
            for name, settings in value.items():
                shown = ", ".join(f"{k}={v}" for k, v in settings.items())
                lines.append(f"algorithm {name}: {shown or '(defaults)'}")
        else:
            lines.append(f"{key}: {value}")
    return lines


def format_summary(summary: dict) -> str:
    return "\n".join(["***** hf_largebatch: what this run decided *****"]
                     + [f"  {line}" for line in summary_lines(summary)])


def warmup_warning(summary: dict) -> str | None:
    """The message when the warm-up does not end before the schedule does (None otherwise)."""
    warmup, length = summary["warmup"], summary["schedule_length"]
    if warmup <= 0 or warmup < length:
        return None
    return (f"the warm-up ({warmup} {summary['clock']}) is not shorter than the run ({length} {summary['clock']}): "
            f"the LR never reaches its peak {summary['peak_lr']:.6g}. Shorten the warm-up (warmup_steps / "
            "warmup_ratio, or legw_base_warmup_epochs: LEGW warms up for S times it) or train longer")
