"""Compiles the CUDA launchers with `nvcc -Xptxas -v` for each architecture and
writes a summary table (registers, spills, stack, shared memory per kernel)
followed by the raw ptxas output, for `make ptxas-report`.

usage: ptxas_report.py OUT_FILE ARCH [ARCH ...]     e.g. ptxas_report.py build/ptxas-report.txt 80 90
"""
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time

from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SOURCE = "csrc/cuda/conv_cuda.cu"


def nvcc_path():
    # torch's own toolkit guess (CUDA_HOME or CUDA_PATH, else the nvcc on PATH,
    # else /usr/local/cuda). Only nvcc is run here, so a wrapper script on PATH
    # (where that guess is not the toolkit: see setup.py) serves as well.
    home = cpp_extension.CUDA_HOME
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return os.path.join(home, "bin", "nvcc")
    found = shutil.which("nvcc")
    if not found:
        sys.exit("ptxas_report: no nvcc found (set CUDA_HOME)")
    return found


def demangle(names):
    cxxfilt = shutil.which("c++filt")
    if not cxxfilt:
        return names
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True).stdout
    return out.splitlines()


def short(name):
    name = name.replace("dce::kernels::cuda_build::", "").replace("dce::kernels::", "")
    name = re.sub(r"Tile<64, 64, 16, 4, 4>", "Tile64x64x16", name)
    name = re.sub(r"\(.*\)$", "", name)
    return name.replace("void ", "")


def main(out_file, archs):
    includes = [f"-I{p}" for p in cpp_extension.include_paths("cuda")]
    includes.append(f"-I{os.path.join(ROOT, 'csrc')}")
    purelib = sysconfig.get_paths()["purelib"]
    for cand in sorted(os.listdir(os.path.join(purelib, "nvidia"))) if os.path.isdir(
            os.path.join(purelib, "nvidia")) else []:
        inc = os.path.join(purelib, "nvidia", cand, "include")
        if os.path.exists(os.path.join(inc, "cusparse.h")):
            includes.append(f"-I{inc}")
    raw, rows = [], []
    for arch in archs:
        cmd = [nvcc_path(), "-c", os.path.join(ROOT, SOURCE), "-o", os.devnull, "-std=c++20", "-O3",
               "--expt-relaxed-constexpr", "-Xcompiler", "-fPIC", "-D_GLIBCXX_USE_CXX11_ABI=1",
               f"-gencode=arch=compute_{arch},code=sm_{arch}", "-Xptxas", "-v", *includes]
        t0 = time.time()
        res = subprocess.run(cmd, capture_output=True, text=True)
        took = time.time() - t0
        if res.returncode != 0:
            sys.stderr.write(res.stderr)
            sys.exit(f"nvcc failed for sm_{arch}")
        raw.append(f"==== sm_{arch} (nvcc {took:.0f} s) ====\n{res.stderr}")
        current = None
        for line in res.stderr.splitlines():
            m = re.search(r"Compiling entry function '([^']+)' for 'sm_(\d+)'", line)
            if m:
                current = {"mangled": m.group(1), "arch": m.group(2)}
                continue
            if current is None:
                continue
            m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
            if m:
                current.update(stack=int(m.group(1)), spill_st=int(m.group(2)), spill_ld=int(m.group(3)))
            m = re.search(r"Used (\d+) registers", line)
            if m:
                current["regs"] = int(m.group(1))
                sm = re.search(r"(\d+) bytes smem", line)
                current["smem"] = int(sm.group(1)) if sm else 0
                rows.append(current)
                current = None
    names = demangle([r["mangled"] for r in rows])
    lines = [f"{'arch':>5} {'regs':>5} {'spill st/ld':>12} {'stack':>6} {'static smem':>12}  kernel"]
    for r, n in sorted(zip(rows, names), key=lambda t: (t[0]["arch"], short(t[1]))):
        lines.append(f"sm_{r['arch']:<3} {r['regs']:>5} {r.get('spill_st', 0):>5}/{r.get('spill_ld', 0):<6}"
                     f" {r.get('stack', 0):>6} {r['smem']:>12}  {short(n)}")
    lines.append("igemm_kernel also takes dynamic shared memory BK*(BM+1 + BN+1)*sizeof(acc): "
                 "8320 B for fp32/fp16/bf16, 16640 B for fp64 (not in ptxas's static smem column)")
    with open(out_file, "w") as f:
        f.write("\n".join(lines) + "\n\n" + "\n".join(raw))
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:] or ["80", "90"])
