"""Data for calibration and evaluation: token streams and calibration windows."""

from .calibration import (
    get_calibration_windows,
    load_token_stream,
    read_records,
    records_to_stream,
    render_record,
    sample_windows,
    tokenize_text,
)

__all__ = [
    "get_calibration_windows",
    "load_token_stream",
    "read_records",
    "records_to_stream",
    "render_record",
    "sample_windows",
    "tokenize_text",
]
