"""``vlprompt bench``: throughput, memory and FLOPs of every method, optimised and reference-style
side by side (``measure``), and an end-to-end base-to-new job on synthetic images (``e2e``)."""

from .measure import (  # noqa: F401
                      BF16_PEAK_TFLOPS,
                      SHAPES,
                      BenchSetting,
                      device_peak_tflops,
                      measure_method,
                      run_bench,
)
from .table import format_table  # noqa: F401
