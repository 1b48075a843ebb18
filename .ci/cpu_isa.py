"""Print the CPU and the instruction set oneDNN runs on it; with --caps, print the capped ISAs that CI reruns the
numeric tests under: a level below this machine's best, and AVX2 (when that is not the best).

Which kernels oneDNN picks (AMX, AVX512 with bf16, plain AVX512, AVX2) changes float results, so a test that
compares two code paths may hold on one CPU and fail on another. `ONEDNN_MAX_CPU_ISA` caps the choice, which lets
one machine run the kernels of another kind.
"""

import os
import platform
import subprocess
import sys

# oneDNN's ISA names, best first, with the words of its verbose "isa:" line that identify each level.
LEVELS = (
    ("AVX512_CORE_AMX", "AMX"),
    ("AVX512_CORE_BF16", "bfloat16"),
    ("AVX512_CORE", "AVX-512"),
    ("AVX2", "AVX2"),
    ("SSE41", "SSE4.1"),
)
PROBE = "import torch; torch.nn.functional.conv2d(torch.rand(1, 32, 32, 32), torch.rand(32, 32, 3, 3))"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def onednn_isa() -> str:
    """The "isa:" line oneDNN prints for a convolution (under the environment's ONEDNN_MAX_CPU_ISA, if any)."""
    env = {**os.environ, "ONEDNN_VERBOSE": "1"}
    output = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env).stdout
    for line in output.splitlines():
        if ",isa:" in line:
            return line.split(",isa:", 1)[1].strip()
    return "unknown (oneDNN printed no ISA)"


def level_of(isa_line: str) -> int:
    for index, (_, marker) in enumerate(LEVELS):
        if marker in isa_line:
            return index
    return len(LEVELS) - 1


def caps(isa_line: str) -> list:
    below = LEVELS[min(level_of(isa_line) + 1, len(LEVELS) - 1)][0]
    return sorted({below, "AVX2"} - {LEVELS[level_of(isa_line)][0]}, key=[name for name, _ in LEVELS].index)


if __name__ == "__main__":
    best = onednn_isa()
    if "--caps" in sys.argv:
        print(" ".join(caps(best)))
    else:
        import torch

        print(f"CPU: {cpu_model()}; oneDNN ISA: {best}; ATen CPU capability: {torch.backends.cpu.get_cpu_capability()}")
