"""
Logs without terminal colour codes.

Detectron2's ``default_setup`` logs the config file and the full config through ``_highlight``,
which runs them through pygments' 256-colour terminal formatter whenever pygments is installed.
The same message goes to ``OUTPUT_DIR/log.txt`` and to stdout, so both log files and captured
stdout (``make demo``'s ``finetune.log``, the long protocol's logs) carried ANSI escape codes.
:func:`plain_config_logs` makes that highlighting a no-op. (Detectron2's coloured ``[time name]``
prefix is already plain when stdout is not a terminal: termcolor checks.)
"""

__all__ = ["plain_config_logs"]


def _plain(code, filename):
    return code


def plain_config_logs():
    """Makes ``detectron2.engine.defaults`` log configs as plain text (idempotent)."""
    from detectron2.engine import defaults

    defaults._highlight = _plain
