"""Data for calibration and evaluation: token streams and calibration windows."""

from .calibration import (
    bos_token_id,
    get_calibration_windows,
    load_token_stream,
    read_records,
    records_to_stream,
    render_record,
    resolve_bos,
    sample_windows,
    tokenize_text,
)

__all__ = [
    "bos_token_id",
    "get_calibration_windows",
    "load_token_stream",
    "read_records",
    "records_to_stream",
    "render_record",
    "resolve_bos",
    "sample_windows",
    "tokenize_text",
]
