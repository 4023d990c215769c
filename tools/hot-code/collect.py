#!/usr/bin/env python3
"""Write tools/hot-code/monsoon.txt: the functions of the monsoon binary a plain pipeline runs,
for tools/hot-code/cc.sh to lay out together.

    make hot-code        (as root: builds both binaries, then runs this)
    tools/hot-code/collect.py [BENCH_ARGS...]

Runs `monsoon-bench target/release/monsoon --only noida` (a snapshot, then streamed inserts,
through the stand-ins) with read-ahead off for the binary's block
device and the binary's pages out of the page cache, so a page of its code is resident only once
the program touched it (to the page: no read-ahead, no whole folios). Every 0.2 s it reads which
code pages each monsoon process has resident (/proc/PID/pagemap), and at the end names every
function on a touched page, in address order. Needs root (read_ahead_kb, pagemap); puts the
device's read-ahead back when it ends. Run it with no other monsoon process about: a page
another process maps stays in the page cache, and would count as touched.
"""
import json, os, struct, subprocess, sys, time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LIST = os.path.join(ROOT, "tools", "hot-code", "monsoon.txt")


def target_dir():
    meta = subprocess.run(["cargo", "metadata", "--format-version", "1", "--no-deps"], cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(meta.stdout)["target_directory"]


def read_ahead_file(path):
    """The read_ahead_kb file of the block device holding `path`."""
    dev = os.stat(path).st_dev
    base = f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}"
    for q in (f"{base}/queue/read_ahead_kb", f"{base}/../queue/read_ahead_kb"):
        if os.path.exists(q):
            return os.path.realpath(q)
    sys.exit(f"no read_ahead_kb for {path} (device {os.major(dev)}:{os.minor(dev)}): run it on a file system on a block device")


def code_segment(binary):
    """(file offset, virtual address) of the executable LOAD segment."""
    out = subprocess.run(["readelf", "-l", "-W", binary], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        f = line.split()
        if f and f[0] == "LOAD" and "E" in f[6:8]:
            return int(f[1], 16), int(f[2], 16)
    sys.exit("no executable segment in " + binary)


def resident_pages(pid, binary, delta, pages):
    """Add the ELF addresses of `binary`'s resident code pages in process `pid` to `pages`."""
    try:
        maps = open(f"/proc/{pid}/maps").read().splitlines()
        with open(f"/proc/{pid}/pagemap", "rb") as pm:
            for line in maps:
                f = line.split()
                if len(f) < 6 or f[5] != binary or "x" not in f[1]:
                    continue
                start, end = (int(x, 16) for x in f[0].split("-"))
                offset = int(f[2], 16)
                n = (end - start) // 4096
                pm.seek(start // 4096 * 8)
                data = pm.read(n * 8)
                for i in range(len(data) // 8):
                    if struct.unpack_from("<Q", data, i * 8)[0] >> 63:
                        pages.add(offset + i * 4096 + delta)
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass


def main():
    if os.geteuid() != 0:
        sys.exit("collect.py needs root: it turns read-ahead off (read_ahead_kb) and reads /proc/PID/pagemap")
    target = target_dir()
    binary = os.path.realpath(os.path.join(target, "release", "monsoon"))
    bench = os.path.join(target, "release", "monsoon-bench")
    args = sys.argv[1:] or ["--docs", "100000", "--stream", "50000", "--backlog", "0"]
    file_offset, vaddr = code_segment(binary)
    delta = vaddr - file_offset
    ra = read_ahead_file(binary)
    saved = open(ra).read().strip()
    pages = set()
    try:
        with open(ra, "w") as f:
            f.write("0")
        fd = os.open(binary, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
        run = subprocess.Popen([bench, binary, "--only", "noida", *args], cwd=ROOT)
        while run.poll() is None:
            for pid in filter(str.isdigit, os.listdir("/proc")):
                try:
                    if os.readlink(f"/proc/{pid}/exe") == binary:
                        resident_pages(pid, binary, delta, pages)
                except OSError:
                    pass
            time.sleep(0.2)
        if run.returncode != 0:
            sys.exit(f"monsoon-bench failed ({run.returncode})")
    finally:
        with open(ra, "w") as f:
            f.write(saved)
    nm = subprocess.run(["nm", "--defined-only", "-S", binary], capture_output=True, text=True, check=True).stdout
    names, seen = [], set()
    for line in sorted(nm.splitlines()):
        f = line.split()
        if len(f) != 4 or f[2] not in "tTwW":
            continue
        start, size = int(f[0], 16), int(f[1], 16)
        first, last = start & ~4095, (start + max(size, 1) - 1) & ~4095
        if any(p in pages for p in range(first, last + 1, 4096)) and f[3] not in seen:
            seen.add(f[3])
            names.append(f[3])
    with open(LIST, "w") as f:
        f.write("\n".join(names) + "\n")
    print(f"{len(pages) * 4 // 1024} MiB of code touched; {len(names)} functions written to {LIST}")


if __name__ == "__main__":
    main()
