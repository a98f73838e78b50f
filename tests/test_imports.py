"""The runtime's host side must work where there is no torch (the ttnn environment)."""
import subprocess
import sys


def test_import_runtime_does_not_import_torch():
    code = ("import sys, runtime, runtime.session, runtime.generator, runtime.pages, runtime.presets, "
            "runtime.cli, runtime.tokenizer, runtime.blockfloat, lowering.program, lowering.optable\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
