/**
 * TLS and mutual TLS with certificates the suite's caller made (pytest writes them to
 * $TLS_CERTS_DIR: ca.pem, server.crt/.key, client.crt/.key); skipped without them.
 * The server uses the fake backend: this is about the handshake, not about Ray.
 */

import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";

import { Client, ClientError } from "../src/index.js";
import { ServerProcess } from "./server.js";

const DIR = process.env["TLS_CERTS_DIR"] ?? "";
const pem = (name: string): string => readFileSync(join(DIR, name), "utf8");

describe("TLS", { skip: DIR === "" ? "TLS_CERTS_DIR is not set" : false }, () => {
  const server = new ServerProcess(
    DIR === ""
      ? []
      : [
          "--backend=fake",
          `--tls-cert=${join(DIR, "server.crt")}`,
          `--tls-key=${join(DIR, "server.key")}`,
          `--tls-client-ca=${join(DIR, "ca.pem")}`,
        ],
  );

  before(() => server.start(60_000), { timeout: 90_000 });
  after(() => server.stop(), { timeout: 60_000 });

  test("mutual TLS with the CA and a client certificate gets in", async () => {
    const c = new Client(server.grpcAddress, {
      token: server.adminToken,
      tls: { ca: pem("ca.pem"), cert: pem("client.crt"), key: pem("client.key") },
    });
    try {
      const models = await c.listModels("projects/default");
      assert.equal(models.models.length, 0);
    } finally {
      c.close();
    }
  });

  test("without a client certificate the handshake fails", async () => {
    const c = new Client(server.grpcAddress, { token: server.adminToken, tls: { ca: pem("ca.pem") } });
    try {
      await assert.rejects(c.listModels("projects/default"), (e: unknown) => {
        assert.ok(e instanceof ClientError, String(e));
        assert.notEqual(e.code, "OK");
        return true;
      });
    } finally {
      c.close();
    }
  });
});
