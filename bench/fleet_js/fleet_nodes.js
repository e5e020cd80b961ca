"use strict";
/*
 * bench/fleet_nodes.py's simulated nodes in Node.js: the same command line, ready file and
 * JSON-lines control protocol, the same nodes on the wire, at a fraction of the CPU.
 *
 * Why: Python's `ssl` and grpclib's pure-Python HTTP/2 cost ~6 ms of CPU per node, ~30 s for
 * a 5,005-node cold start on the same 2 cores as the control plane, more than the cold start's
 * whole 20 s target. Here TLS is OpenSSL and HTTP/2 is nghttp2, both in C under Node's `tls` and
 * `http2`; only the bookkeeping is JavaScript.
 *
 * What each node does is what meshward/testing/ads_client.py's AdsClient does for the fleet:
 * its own mTLS connection (one HTTP/2 session per node, never shared) with its service's SVID
 * under WORK/creds, the chain checked against the mesh roots and the server's URI SAN against
 * SERVER_IDENTITY; one ADS stream (gRPC's 5-byte framing over HTTP/2); node id and cluster both
 * the node's name; CDS and LDS as wildcards, then the EDS names the clusters reference and the
 * RDS names the listeners' HttpConnectionManagers reference; no SDS; every resource decoded to
 * its type before the response is ACKed (a decode failure NACKs it); in retry mode a failed
 * stream is opened again after 0.5 s, its first requests carrying what the node holds.
 *
 * The message types come from WORK/descriptors.pb, a FileDescriptorSet the bench exports from
 * the Python side's descriptor pool (bench/fleet_workers.py), decoded with protobufjs.
 *
 *   node bench/fleet_js/fleet_nodes.js WORK ADS_PORT SERVER_IDENTITY READY_FILE [sotw|delta] [SHARD/COUNT]
 */


const fs = require("fs");
const path = require("path");
const net = require("net");
const tls = require("tls");
const {
  CLUSTER, ENDPOINT, ROUTE, ORDER, PROBE_NAME, MAX_PROBE_WAITS, USAGE,
  Client, loadTypes, warmUp, sameList, errorKind, wallNow, monoNow, sleep,
} = require("./ads_client");

function main(argv) {
  const mode = argv.length > 4 ? argv[4] : "sotw";
  let shard = [0, 1];
  if (argv.length > 5) {
    const m = /^(\d+)\/(\d+)$/.exec(argv[5]);
    shard = m ? [Number(m[1]), Number(m[2])] : null;
    if (shard && !(shard[0] < shard[1])) shard = null;
  }
  if (argv.length < 4 || argv.length > 6 || !["sotw", "delta"].includes(mode) || !shard) {
    process.stderr.write(USAGE + "\n");
    process.exit(1);
  }
  const [work, portText, identity, readyFile] = argv;
  const delta = mode === "delta";
  const port = Number(portText);
  const creds = path.join(work, "creds");
  const roots = fs.readFileSync(path.join(creds, "ca.pem"));
  const all = JSON.parse(fs.readFileSync(path.join(work, "nodes.json"), "utf8"));
  const nodes = all.filter((_, i) => i >= shard[0] && (i - shard[0]) % shard[1] === 0);
  const mine = new Set(nodes);
  const contexts = new Map();
  const clients = [];
  const routeCount = new Map();
  const lastRoute = new Map();
  const anyCount = new Map();
  let delivered = 0;
  let marked = { routes: new Map(), any: new Map(), delivered: 0 };
  const probe = { on: false, sent: 0, max: 0, answers: 0, toggle: false, sentWall: 0, name: PROBE_NAME, waits: [] };
  const unconfigured = new Set();
  const waiting = new Set();
  const failures = {};
  const when = [];
  let burstStart = 0;

  const ctx = {
    delta,
    port,
    identity,
    types: loadTypes(path.join(work, "descriptors.pb")),
    onResponse(client, typeUrl, response) {
      const node = client.nodeId;
      anyCount.set(node, (anyCount.get(node) || 0) + 1);
      if (unconfigured.has(node) && client.configured()) unconfigured.delete(node);
      delivered += (response.resources || []).length;
      if (typeUrl === ROUTE) {
        routeCount.set(node, (routeCount.get(node) || 0) + 1);
        lastRoute.set(node, wallNow());
        waiting.delete(node);
      }
      if (typeUrl === CLUSTER && client.edsChanged) {
        // follow EDS like Envoy: the clusters' service names (compared again only when a
        // cluster's changed: the same subscription is sent either way)
        client.edsChanged = false;
        const names = [...client.clusterEds.values()].filter((n) => n !== null).sort();
        if (!sameList(names, client.subscriptions.get(ENDPOINT) || [])) client.subscribe(ENDPOINT, names);
      }
      if (
        node.endsWith("/probe") &&
        typeUrl === ROUTE &&
        probe.sent &&
        (!delta || (response.removed_resources || []).includes(probe.name))
      ) {
        const waited = monoNow() - probe.sent;
        probe.max = Math.max(probe.max, waited);
        probe.answers += 1;
        if (probe.waits.length < MAX_PROBE_WAITS) probe.waits.push([probe.sentWall, waited]);
        probe.sent = 0;
      }
    },
  };

  /** The service's SVID and the roots, loaded once per service (its replicas share them). */
  function secureContext(node) {
    const [ns, name] = node.split("/");
    const key = `${ns}/${name}`;
    if (!contexts.has(key)) {
      const dir = path.join(creds, ns, name);
      contexts.set(
        key,
        tls.createSecureContext({
          ca: roots,
          cert: fs.readFileSync(path.join(dir, "cert.pem")),
          key: fs.readFileSync(path.join(dir, "key.pem")),
        }),
      );
    }
    return contexts.get(key);
  }

  function newClient(node) {
    return new Client(ctx, node, secureContext(node));
  }

  // Before the ready file, so before any clock starts: the SVIDs loaded (an agent-run Envoy
  // holds its own before it connects; OpenSSL 3 parses a PEM key and chain in ~2.5 ms) and the
  // decoders generated.
  for (const node of nodes) secureContext(node);
  warmUp(ctx.types.root);

  /** Reconnect after a failure, as Envoy does (its ADS backoff starts at 500 ms). */
  async function again(client) {
    for (;;) {
      const began = monoNow();
      await client.run();
      if (client.error === null) return;
      const kind = errorKind(client.error);
      failures[kind] = (failures[kind] || 0) + 1;
      const got = ORDER.filter((t) => client.views.has(t) && client.views.get(t).responses).length;
      when.push([round1(began - burstStart), round1(monoNow() - began), got]);
      await sleep(0.5);
    }
  }

  async function listening() {
    const deadline = monoNow() + 900;
    for (;;) {
      const ok = await new Promise((resolve) => {
        const sock = net.connect(port, "127.0.0.1");
        sock.once("connect", () => {
          sock.destroy();
          resolve(true);
        });
        sock.once("error", () => resolve(false));
      });
      if (ok) return Date.now() / 1000;
      if (monoNow() > deadline) throw new Error("the ADS port never opened");
      await sleep(0.01);
    }
  }

  async function connect(retry, wait) {
    const listeningWall = wait ? await listening() : wallNow();
    burstStart = monoNow();
    for (const node of nodes) unconfigured.add(node);
    for (const node of nodes) {
      const client = newClient(node);
      clients.push(client);
      if (retry) again(client);
      else client.run();
      await new Promise(setImmediate); // a burst, as a fleet reconnecting to a restarted server
    }
    const start = monoNow();
    let polls = 0;
    while (unconfigured.size) {
      polls += 1;
      if (!retry && polls % 10 === 0) {
        const failed = clients.filter((c) => c.error !== null);
        if (failed.length) {
          const e = failed[0].error;
          throw new Error(`${failed.length} clients failed: ${e.name}(${JSON.stringify(e.message)})`);
        }
      }
      if (monoNow() - start > 900) throw new Error("clients did not all get their config");
      await sleep(0.02);
    }
    when.sort((a, b) => a[0] - b[0] || a[1] - b[1] || a[2] - b[2]);
    const step = Math.max(1, Math.floor(when.length / 40));
    return {
      all_configured_wall: wallNow(),
      listening_wall: listeningWall,
      resources: delivered,
      failures,
      failure_times: when.filter((_, i) => i % step === 0),
    };
  }

  async function waitFor(targets, timeout) {
    const deadline = monoNow() + timeout;
    waiting.clear();
    for (const n of targets) if ((routeCount.get(n) || 0) <= (marked.routes.get(n) || 0)) waiting.add(n);
    while (waiting.size) {
      if (monoNow() > deadline) {
        throw new Error(`only ${targets.length - waiting.size} of ${targets.length} nodes updated`);
      }
      await sleep(0.005);
    }
    let last = 0;
    for (const n of targets) last = Math.max(last, lastRoute.get(n) || 0);
    return { last_wall: last, resources: delivered - marked.delivered };
  }

  /** fleet_nodes.py's prober: SotW toggles a route name that does not exist in and out of the
   * subscription; delta subscribes a new such name each time, the previous one unsubscribed. */
  async function prober(client) {
    let serial = 0;
    while (probe.on) {
      if (!probe.sent) {
        probe.toggle = !probe.toggle;
        const names = (client.subscriptions.get(ROUTE) || []).filter((n) => !n.startsWith(PROBE_NAME));
        serial += 1;
        probe.name = delta ? `${PROBE_NAME}-${serial}` : PROBE_NAME;
        if (delta || probe.toggle) names.push(probe.name);
        probe.sent = monoNow();
        probe.sentWall = wallNow();
        client.subscribe(ROUTE, names);
      } else {
        const waited = monoNow() - probe.sent;
        probe.max = Math.max(probe.max, waited);
        if (delta && !(client.subscriptions.get(ROUTE) || []).includes(probe.name)) {
          // re-subscribed for a new listener, the name dropped: no answer will come
          if (probe.waits.length < MAX_PROBE_WAITS) probe.waits.push([probe.sentWall, waited]);
          probe.sent = 0;
          continue;
        }
      }
      await sleep(0.01);
    }
  }

  async function command(line, state) {
    const space = line.indexOf(" ");
    const name = space < 0 ? line : line.slice(0, space);
    const rest = space < 0 ? "" : line.slice(space + 1);
    if (name === "connect") {
      const options = rest.split(/\s+/);
      return connect(options.includes("retry"), options.includes("listening"));
    }
    if (name === "mark") {
      marked = { routes: new Map(routeCount), any: new Map(anyCount), delivered };
      return { marked: true };
    }
    if (name === "wait") {
      const cut = rest.lastIndexOf(" ");
      const targets = JSON.parse(rest.slice(0, cut)).filter((n) => mine.has(n));
      return waitFor(targets, Number(rest.slice(cut + 1)));
    }
    if (name === "touched") {
      let count = 0;
      for (const [n, c] of anyCount) if (c > (marked.any.get(n) || 0)) count += 1;
      return { nodes: count };
    }
    if (name === "probe" && rest === "on") {
      const first = nodes[0].split("/");
      const client = newClient(`${first[0]}/${first[1]}/probe`);
      clients.push(client);
      client.run();
      const start = monoNow();
      while (!client.configured()) {
        if (client.error) throw client.error;
        if (monoNow() - start > 120) throw new Error("the probe got no config");
        await sleep(0.01);
      }
      Object.assign(probe, { on: true, max: 0, answers: 0, sent: 0, waits: [] });
      state.probe = prober(client);
      return { probing: true };
    }
    if (name === "probe" && rest === "off") {
      probe.on = false;
      if (state.probe) await state.probe;
      const waits = [...probe.waits];
      if (probe.sent) waits.push([probe.sentWall, monoNow() - probe.sent]);
      return { max_stall: probe.max, answers: probe.answers, waits };
    }
    return { error: `unknown command ${line}` };
  }

  const server = net.createServer((sock) => {
    const state = {};
    let buffered = "";
    let chain = Promise.resolve();
    let closed = false;
    const quit = () => {
      if (closed) return;
      closed = true;
      sock.end('{"bye": true}\n', () => {
        for (const client of clients) client.close();
        process.exit(0);
      });
    };
    sock.setEncoding("utf8");
    sock.on("data", (chunk) => {
      buffered += chunk;
      let newline;
      while ((newline = buffered.indexOf("\n")) >= 0) {
        const line = buffered.slice(0, newline).trim();
        buffered = buffered.slice(newline + 1);
        chain = chain.then(async () => {
          if (closed) return;
          if (!line || line === "quit") return quit();
          let answer;
          try {
            answer = await command(line, state);
          } catch (err) {
            answer = { error: `${err.name || "Error"}: ${err.message}` };
          }
          sock.write(JSON.stringify(answer) + "\n");
        });
      }
    });
    sock.on("end", () => {
      chain = chain.then(quit);
    });
    sock.on("error", () => {});
  });
  server.listen(0, "127.0.0.1", () => {
    const tmp = readyFile.replace(/\.[^./]*$/, "") + ".tmp";
    fs.writeFileSync(tmp, JSON.stringify({ control: server.address().port }));
    fs.renameSync(tmp, readyFile);
  });
}

function round1(x) {
  return Math.round(x * 10) / 10;
}

main(process.argv.slice(2));
