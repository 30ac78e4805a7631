/**
 * A small deterministic zip writer for model sources (what UploadSource takes).
 *
 * Same files, same bytes: entries sorted by name, timestamps fixed at 1980-01-01,
 * permissions fixed (regular files, 0644), deflate compression. Like `modelctl build`,
 * zipDirectory leaves out caches, VCS folders, virtual environments, bytecode and
 * symlinks. No zip64: at most 65,535 entries and 4 GiB.
 */

import { lstatSync, readdirSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { crc32, deflateRawSync } from "node:zlib";

/** Folders zipDirectory leaves out, at any depth. */
export const EXCLUDED_DIRS: ReadonlySet<string> = new Set([
  "__pycache__",
  ".git",
  ".hg",
  ".svn",
  ".venv",
  ".mypy_cache",
  ".pytest_cache",
  ".ruff_cache",
  "node_modules",
]);
const EXCLUDED_SUFFIXES = [".pyc", ".pyo"];
const EXCLUDED_FILES: ReadonlySet<string> = new Set([".DS_Store"]);

export interface ZipEntry {
  /** Relative POSIX path inside the archive, e.g. "pkg/model.py". */
  name: string;
  data: Uint8Array;
}

const DOS_TIME = 0; // 00:00:00
const DOS_DATE = (0 << 9) | (1 << 5) | 1; // 1980-01-01, the earliest a zip entry can hold
const VERSION = 20; // 2.0: deflate
const MADE_BY_UNIX = (3 << 8) | VERSION;
const REGULAR_FILE_0644 = (0o100644 << 16) >>> 0;
const UTF8_NAMES = 0x0800;
const METHOD_DEFLATE = 8;
const MAX_U16 = 0xffff;
const MAX_U32 = 0xffffffff;

/** Checks a name the server would accept: relative, no "..", no backslash, no NUL. */
function checkName(name: string): void {
  const problem =
    name === "" || name === "." || name.endsWith("/")
      ? "is empty or a folder"
      : name.includes("\0")
        ? "contains a NUL character"
        : name.includes("\\")
          ? "contains a backslash"
          : name.startsWith("/") || /^[A-Za-z]:/.test(name)
            ? "is an absolute path"
            : name.split("/").includes("..")
              ? "contains a '..' component"
              : "";
  if (problem) {
    throw new Error(`zip entry ${JSON.stringify(name)} ${problem}`);
  }
}

/** A zip archive of `entries` (sorted by name; duplicate names are an error). */
export function zipEntries(entries: readonly ZipEntry[]): Uint8Array {
  const sorted = [...entries].sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
  if (sorted.length > MAX_U16) {
    throw new Error(`too many zip entries: ${sorted.length} (at most ${MAX_U16})`);
  }
  const locals: Buffer[] = [];
  const centrals: Buffer[] = [];
  let offset = 0;
  let previous: string | undefined;
  for (const entry of sorted) {
    checkName(entry.name);
    if (entry.name === previous) {
      throw new Error(`zip entry ${JSON.stringify(entry.name)} appears more than once`);
    }
    previous = entry.name;
    const name = Buffer.from(entry.name, "utf8");
    const compressed = deflateRawSync(entry.data);
    const crc = crc32(entry.data) >>> 0;
    if (entry.data.length > MAX_U32 || compressed.length > MAX_U32 || offset > MAX_U32) {
      throw new Error("the archive is too large for a zip without zip64");
    }

    const local = Buffer.alloc(30);
    local.writeUInt32LE(0x04034b50, 0);
    local.writeUInt16LE(VERSION, 4);
    local.writeUInt16LE(UTF8_NAMES, 6);
    local.writeUInt16LE(METHOD_DEFLATE, 8);
    local.writeUInt16LE(DOS_TIME, 10);
    local.writeUInt16LE(DOS_DATE, 12);
    local.writeUInt32LE(crc, 14);
    local.writeUInt32LE(compressed.length, 18);
    local.writeUInt32LE(entry.data.length, 22);
    local.writeUInt16LE(name.length, 26);
    local.writeUInt16LE(0, 28); // extra field length
    locals.push(local, name, compressed);

    const central = Buffer.alloc(46);
    central.writeUInt32LE(0x02014b50, 0);
    central.writeUInt16LE(MADE_BY_UNIX, 4);
    central.writeUInt16LE(VERSION, 6);
    central.writeUInt16LE(UTF8_NAMES, 8);
    central.writeUInt16LE(METHOD_DEFLATE, 10);
    central.writeUInt16LE(DOS_TIME, 12);
    central.writeUInt16LE(DOS_DATE, 14);
    central.writeUInt32LE(crc, 16);
    central.writeUInt32LE(compressed.length, 20);
    central.writeUInt32LE(entry.data.length, 24);
    central.writeUInt16LE(name.length, 28);
    central.writeUInt16LE(0, 30); // extra field length
    central.writeUInt16LE(0, 32); // comment length
    central.writeUInt16LE(0, 34); // disk number
    central.writeUInt16LE(0, 36); // internal attributes
    central.writeUInt32LE(REGULAR_FILE_0644, 38);
    central.writeUInt32LE(offset, 42);
    centrals.push(central, name);

    offset += local.length + name.length + compressed.length;
  }
  const directory = Buffer.concat(centrals);
  if (offset > MAX_U32 || directory.length > MAX_U32) {
    throw new Error("the archive is too large for a zip without zip64");
  }
  const end = Buffer.alloc(22);
  end.writeUInt32LE(0x06054b50, 0);
  end.writeUInt16LE(0, 4); // this disk
  end.writeUInt16LE(0, 6); // disk with the central directory
  end.writeUInt16LE(sorted.length, 8);
  end.writeUInt16LE(sorted.length, 10);
  end.writeUInt32LE(directory.length, 12);
  end.writeUInt32LE(offset, 16);
  end.writeUInt16LE(0, 20); // comment length
  return new Uint8Array(Buffer.concat([...locals, directory, end]));
}

/** The files under `dir` (relative POSIX names, sorted), as zipDirectory stores them. */
export function listSourceFiles(dir: string): string[] {
  const names: string[] = [];
  const walk = (folder: string, prefix: string): void => {
    for (const entry of readdirSync(folder).sort()) {
      const path = join(folder, entry);
      const stat = lstatSync(path);
      if (stat.isSymbolicLink()) {
        continue; // never follow links: the server would reject them anyway
      }
      if (stat.isDirectory()) {
        if (!EXCLUDED_DIRS.has(entry)) {
          walk(path, `${prefix}${entry}/`);
        }
      } else if (
        stat.isFile() &&
        !EXCLUDED_FILES.has(entry) &&
        !EXCLUDED_SUFFIXES.some((suffix) => entry.endsWith(suffix))
      ) {
        names.push(`${prefix}${entry}`);
      }
    }
  };
  if (!lstatSync(dir).isDirectory()) {
    throw new Error(`${dir} is not a folder`);
  }
  walk(dir, "");
  return names;
}

/** A deterministic zip of the model code in `dir` (see the module's doc for what is left out). */
export function zipDirectory(dir: string): Uint8Array {
  const names = listSourceFiles(dir);
  if (names.length === 0) {
    throw new Error(`${dir} holds no files to zip`);
  }
  return zipEntries(names.map((name) => ({ name, data: readFileSync(join(dir, ...name.split("/"))) })));
}
