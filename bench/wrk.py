"""Load from `wrk` (Debian's package) replaying pre-signed requests.

A Python load generator on this 2-core machine takes most of a core, CPU the server under test
then lacks; wrk sends the same requests for a fraction of it. Every request is built and signed
before the run (signatures cover the body, so wrk cannot make them), written to a file that the
Lua script below reads: per record, a header count, one `name<TAB>value` line per header and
the body on one line. wrk thread n of N sends records n, n+N, n+2N...
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

REPLAY_SCRIPT = r"""
local records, index = {}, 0
local counter, threads = 0, {}
wrapped = 0
function setup(thread)
  thread:set("offset", counter)
  counter = counter + 1
  threads[#threads + 1] = thread
end
function init(args)
  local file = io.open(args[1], "r")
  local lines = {}
  for line in file:lines() do lines[#lines + 1] = line end
  file:close()
  local step, path = tonumber(args[2]), args[3]
  local i, n = 1, 0
  while i <= #lines do
    local count, headers = tonumber(lines[i]), {}
    for j = 1, count do
      local name, value = lines[i + j]:match("^([^\t]+)\t(.*)$")
      headers[name] = value
    end
    if n % step == offset then
      records[#records + 1] = wrk.format("POST", path, headers, lines[i + count + 1])
    end
    n, i = n + 1, i + count + 2
  end
end
function request()
  index = index + 1
  if index > #records then
    index, wrapped = 1, wrapped + 1
  end
  return records[index]
end
done = function(summary, latency, requests)
  local repeats = 0
  for _, thread in ipairs(threads) do repeats = repeats + thread:get("wrapped") end
  io.write(string.format("RESULT %d %d %d %f %f %d\n", summary.requests,
    summary.errors.status + summary.errors.connect + summary.errors.read
      + summary.errors.write + summary.errors.timeout,
    summary.duration, latency:percentile(50), latency:percentile(99), repeats))
end
"""

THREADS = 2


def available() -> bool:
    return shutil.which("wrk") is not None


def write_records(path: Path, records: Iterable[tuple[bytes, Mapping[str, str]]]) -> int:
    """Write (body, headers) records for the replay script; returns how many."""
    count = 0
    with path.open("w") as out:
        for body, headers in records:
            text = body.decode()
            if "\n" in text or any("\n" in v or "\t" in k for k, v in headers.items()):
                raise ValueError("a record's body and headers must be single lines")
            out.write(f"{len(headers)}\n")
            out.writelines(f"{name}\t{value}\n" for name, value in headers.items())
            out.write(f"{text}\n")
            count += 1
    return count


def replay(
    url: str,
    records: Iterable[tuple[bytes, Mapping[str, str]]],
    *,
    seconds: float,
    connections: int,
    may_repeat: bool = False,
) -> dict[str, float]:
    """POST the records to `url` on `connections` keep-alive connections for `seconds`:
    requests/s, p50 and p99 in ms, requests and errors (non-2xx/3xx or a socket error). Unless
    `may_repeat`, running out of records (wrk would send some twice) is an error."""
    base, _, path = url.partition("//")[2].partition("/")
    with tempfile.TemporaryDirectory() as tmp:
        script, data = Path(tmp) / "replay.lua", Path(tmp) / "records.txt"
        script.write_text(REPLAY_SCRIPT)
        write_records(data, records)
        finished = subprocess.run(
            [
                "wrk",
                f"-t{min(THREADS, connections)}",
                f"-c{connections}",
                f"-d{max(1, round(seconds))}s",
                "--latency",
                "-s",
                str(script),
                f"http://{base}",
                "--",
                str(data),
                str(min(THREADS, connections)),
                f"/{path}",
            ],
            capture_output=True,
            text=True,
            check=True,
        )
    line = next(row for row in finished.stdout.splitlines() if row.startswith("RESULT"))
    _, n, errors, duration_us, p50_us, p99_us, repeats = line.split()
    if int(repeats) and not may_repeat:
        raise SystemExit("wrk ran out of pre-signed requests; give it more")
    return {
        "rps": int(n) / (int(duration_us) / 1e6),
        "p50": float(p50_us) / 1000,
        "p99": float(p99_us) / 1000,
        "n": int(n),
        "errors": int(errors),
    }
