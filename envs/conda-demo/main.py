"""conda-demo: shows what the conda env provides (container side: never imports envmgr)."""

import os
import subprocess
import sys

import envmgr_alpha
import greet_py

print(f"python {sys.version.split()[0]} in {sys.prefix}")
print(f"pip package: {envmgr_alpha.GREETING}")
print(f"conda noarch package: {greet_py.MESSAGE}")
print(f"activation script: HELLO_TOOL_HOME={os.environ.get('HELLO_TOOL_HOME')}")
print(subprocess.run(["hello-tool"], capture_output=True, text=True, check=True).stdout.strip())
