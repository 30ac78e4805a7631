/**
 * A real `modelctl serve` for the tests: a local Ray cluster of its own (or the one at
 * $RAY_ADDRESS), on free ports, with a fresh data dir. start() resolves on its one
 * `ready grpc=HOST:P http=HOST:H` line; stop() SIGTERMs it and waits for it to exit.
 *
 * $MODELCTL: the modelctl executable (default: the repo's ../../.venv/bin/modelctl).
 */

import { spawn, type ChildProcess } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";

/** clients/typescript, whether this runs from test/ or dist/test/. */
export const PACKAGE_ROOT = (() => {
  let dir = dirname(fileURLToPath(import.meta.url));
  while (dir !== dirname(dir) && !dir.endsWith(join("clients", "typescript"))) {
    dir = dirname(dir);
  }
  return dir;
})();
export const REPO_ROOT = resolve(PACKAGE_ROOT, "..", "..");
export const MODELCTL = process.env["MODELCTL"] ?? join(REPO_ROOT, ".venv", "bin", "modelctl");

const STDERR_TAIL = 8000;

export class ServerProcess {
  grpcAddress = "";
  /** The admin token `modelctl serve` wrote at its first start (DATA_DIR/admin.token). */
  adminToken = "";
  httpAddress = "";
  private proc: ChildProcess | undefined;
  private exited: Promise<number | null> | undefined;
  private stopped: Promise<number | null> | undefined;
  private stderr = "";
  private readonly dataDir = mkdtempSync(join(tmpdir(), "modelctl-ts-"));

  /** The last lines the server logged (stderr), for failure messages. */
  log(): string {
    return this.stderr.slice(-STDERR_TAIL);
  }

  /** `extra`: more `modelctl serve` flags (e.g. TLS, or --backend=fake for a quick one). */
  constructor(private readonly extra: readonly string[] = []) {}

  async start(readyTimeoutMs = 120_000): Promise<void> {
    const args = [
      "serve",
      "--grpc-port=0",
      "--http-port=0",
      `--data-dir=${this.dataDir}`,
      "--num-cpus=4",
      "--num-gpus=1",
      ...this.extra,
    ];
    const rayAddress = process.env["RAY_ADDRESS"];
    if (rayAddress) {
      args.push("--ray-address", rayAddress);
    }
    const proc = spawn(MODELCTL, args, {
      env: { ...process.env, RAY_AUTH_MODE: "disabled", PYTHONUNBUFFERED: "1" },
      stdio: ["ignore", "pipe", "pipe"],
    });
    this.proc = proc;
    this.exited = new Promise((done) => {
      proc.once("exit", (code) => done(code));
      proc.once("error", (err) => {
        this.stderr += `\n[spawn ${MODELCTL}: ${err.message}]`;
        done(null);
      });
    });
    proc.stderr?.setEncoding("utf8");
    proc.stderr?.on("data", (text: string) => {
      this.stderr = (this.stderr + text).slice(-4 * STDERR_TAIL);
    });
    const lines = createInterface({ input: proc.stdout! });
    const ready = new Promise<string>((resolveLine, reject) => {
      lines.on("line", (line) => {
        if (line.startsWith("ready ")) resolveLine(line);
      });
      void this.exited!.then((code) =>
        reject(new Error(`modelctl serve exited (${code}) before it was ready`)),
      );
    });
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<never>((_, reject) => {
      timer = setTimeout(
        () => reject(new Error(`modelctl serve was not ready after ${readyTimeoutMs / 1000}s`)),
        readyTimeoutMs,
      );
    });
    try {
      const line = await Promise.race([ready, timeout]);
      const fields = Object.fromEntries(
        line.split(" ").slice(1).map((kv) => kv.split("=", 2) as [string, string]),
      );
      this.grpcAddress = fields["grpc"] ?? "";
      this.httpAddress = fields["http"] ?? "";
      if (!this.grpcAddress || !this.httpAddress) {
        throw new Error(`unexpected ready line: ${JSON.stringify(line)}`);
      }
      this.adminToken = readFileSync(join(this.dataDir, "admin.token"), "utf8").trim();
    } catch (e) {
      await this.stop();
      throw new Error(`${(e as Error).message}\n--- modelctl serve stderr ---\n${this.log()}`);
    } finally {
      clearTimeout(timer);
    }
  }

  /**
   * SIGTERM (the server drains and stops its Ray), then SIGKILL if it hangs; resolves to
   * the exit code (null when killed). Calling it again gives the first call's result.
   */
  stop(graceMs = 90_000): Promise<number | null> {
    this.stopped ??= this.terminate(graceMs);
    return this.stopped;
  }

  private async terminate(graceMs: number): Promise<number | null> {
    const proc = this.proc;
    if (proc === undefined || this.exited === undefined) return null;
    if (proc.exitCode === null && proc.signalCode === null) {
      proc.kill("SIGTERM");
    }
    let timer: NodeJS.Timeout | undefined;
    const killed = new Promise<"hung">((done) => {
      timer = setTimeout(() => done("hung"), graceMs);
    });
    const first = await Promise.race([this.exited, killed]);
    clearTimeout(timer);
    let code: number | null;
    if (first === "hung") {
      proc.kill("SIGKILL");
      await this.exited;
      code = null;
    } else {
      code = first;
    }
    rmSync(this.dataDir, { recursive: true, force: true });
    return code;
  }
}
