/** The zip writer, read back entry by entry (no server needed). */

import assert from "node:assert/strict";
import { mkdirSync, mkdtempSync, rmSync, symlinkSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, test } from "node:test";
import { crc32, inflateRawSync } from "node:zlib";

import { listSourceFiles, zipDirectory, zipEntries } from "../src/index.js";

interface ReadEntry {
  name: string;
  data: Buffer;
  mode: number;
}

/** The entries of a zip, found through its central directory, each checked against its crc. */
function readZip(zip: Uint8Array): ReadEntry[] {
  const buf = Buffer.from(zip);
  const end = buf.length - 22;
  assert.equal(buf.readUInt32LE(end), 0x06054b50, "end of central directory record");
  const count = buf.readUInt16LE(end + 10);
  let at = buf.readUInt32LE(end + 16);
  const entries: ReadEntry[] = [];
  for (let i = 0; i < count; i++) {
    assert.equal(buf.readUInt32LE(at), 0x02014b50, "central directory header");
    const method = buf.readUInt16LE(at + 10);
    const crc = buf.readUInt32LE(at + 16);
    const compressed = buf.readUInt32LE(at + 20);
    const size = buf.readUInt32LE(at + 24);
    const nameLength = buf.readUInt16LE(at + 28);
    const extra = buf.readUInt16LE(at + 30);
    const comment = buf.readUInt16LE(at + 32);
    const mode = buf.readUInt32LE(at + 38) >>> 16;
    const offset = buf.readUInt32LE(at + 42);
    const name = buf.toString("utf8", at + 46, at + 46 + nameLength);
    assert.equal(buf.readUInt32LE(offset), 0x04034b50, `local header of ${name}`);
    const start = offset + 30 + buf.readUInt16LE(offset + 26) + buf.readUInt16LE(offset + 28);
    const raw = buf.subarray(start, start + compressed);
    const data = method === 8 ? inflateRawSync(raw) : raw;
    assert.equal(data.length, size, `size of ${name}`);
    assert.equal(crc32(data) >>> 0, crc, `crc of ${name}`);
    entries.push({ name, data, mode });
    at += 46 + nameLength + extra + comment;
  }
  return entries;
}

const dir = mkdtempSync(join(tmpdir(), "zip-test-"));
after(() => rmSync(dir, { recursive: true, force: true }));

test("zipDirectory stores the model's files, sorted, and leaves out caches and links", () => {
  mkdirSync(join(dir, "pkg", "__pycache__"), { recursive: true });
  mkdirSync(join(dir, ".git"));
  writeFileSync(join(dir, "model.py"), "def predict(body):\n    return body\n");
  writeFileSync(join(dir, "requirements.txt"), "");
  writeFileSync(join(dir, "pkg", "util.py"), "X = 1\n".repeat(1000));
  writeFileSync(join(dir, "pkg", "__pycache__", "util.cpython-311.pyc"), "junk");
  writeFileSync(join(dir, "pkg", "old.pyc"), "junk");
  writeFileSync(join(dir, ".git", "HEAD"), "ref: main");
  symlinkSync("/etc/passwd", join(dir, "passwd"));

  assert.deepEqual(listSourceFiles(dir), ["model.py", "pkg/util.py", "requirements.txt"]);
  const entries = readZip(zipDirectory(dir));
  assert.deepEqual(
    entries.map((e) => e.name),
    ["model.py", "pkg/util.py", "requirements.txt"],
  );
  assert.equal(entries[0]?.data.toString(), "def predict(body):\n    return body\n");
  assert.equal(entries[1]?.data.toString(), "X = 1\n".repeat(1000));
  assert.equal(entries[2]?.data.length, 0);
  assert.ok(entries.every((e) => e.mode === 0o100644), "regular files, 0644");
});

test("the same files give the same bytes", () => {
  assert.deepEqual(zipDirectory(dir), zipDirectory(dir));
  const a = zipEntries([
    { name: "b.py", data: Buffer.from("b") },
    { name: "a.py", data: Buffer.from("a") },
  ]);
  const b = zipEntries([
    { name: "a.py", data: Buffer.from("a") },
    { name: "b.py", data: Buffer.from("b") },
  ]);
  assert.deepEqual(a, b);
});

test("unsafe or duplicate entry names are refused", () => {
  for (const name of ["../evil.py", "/abs.py", "a\\b.py", "x/../../y.py", ""]) {
    assert.throws(() => zipEntries([{ name, data: Buffer.from("") }]), /zip entry/, name);
  }
  assert.throws(
    () =>
      zipEntries([
        { name: "a.py", data: Buffer.from("1") },
        { name: "a.py", data: Buffer.from("2") },
      ]),
    /more than once/,
  );
});
