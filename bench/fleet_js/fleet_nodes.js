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
const http2 = require("http2");
const tls = require("tls");
const { performance } = require("perf_hooks");
const protobuf = require("protobufjs");
require("protobufjs/ext/descriptor");

const CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
const ENDPOINT = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
const LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener";
const ROUTE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
const HCM =
  "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
const ORDER = [CLUSTER, ENDPOINT, "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret", LISTENER, ROUTE];
const SOTW_METHOD = "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources";
const DELTA_METHOD = "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources";
const PROBE_NAME = "meshward-probe-route";
const MAX_PROBE_WAITS = 20000;
// grpclib's HTTP/2 windows (grpclib.config: 4 MiB per stream and per connection), so the server
// sends the same frames to these nodes as to the Python ones.
const WINDOW = 4194304;
const USAGE =
  "node bench/fleet_js/fleet_nodes.js WORK ADS_PORT SERVER_IDENTITY READY_FILE [sotw|delta] [SHARD/COUNT]";

const wallNow = () => (performance.timeOrigin + performance.now()) / 1000;
const monoNow = () => performance.now() / 1000;
const sleep = (seconds) => new Promise((resolve) => setTimeout(resolve, seconds * 1000));

class ServerIdentityMismatch extends Error {
  get name() {
    return "ServerIdentityMismatch";
  }
}

class GRPCError extends Error {
  get name() {
    return "GRPCError";
  }
}

function loadTypes(file) {
  // protobufjs 8's decoders set a oneof's virtual property after reading any of its members,
  // and its setter deletes the other members' properties: objects fall into dictionary mode,
  // twice the decode's cost (measured on the fleet's resources). A well-formed message holds
  // at most one member, so there is nothing to delete; every field is still decoded.
  protobuf.util.oneOfSetter = () => function setOneOf() {};
  const root = protobuf.Root.fromDescriptor(fs.readFileSync(file), { keepCase: true });
  const t = (name) => root.lookupType(name);
  return {
    request: t("envoy.service.discovery.v3.DiscoveryRequest"),
    response: t("envoy.service.discovery.v3.DiscoveryResponse"),
    deltaRequest: t("envoy.service.discovery.v3.DeltaDiscoveryRequest"),
    deltaResponse: t("envoy.service.discovery.v3.DeltaDiscoveryResponse"),
    hcm: t(HCM.split("/")[1]),
    root,
    // every type a response may carry, by type URL
    byUrl: new Map(ORDER.map((url) => [url, t(url.split("/")[1])])),
  };
}

/** Generate every message type's decoder and encoder now (protobufjs makes each on its first
 * use: ~0.3 s of one process's CPU that would otherwise land inside the cold start's burst). */
function warmUp(namespace) {
  for (const child of namespace.nestedArray) {
    if (child instanceof protobuf.Type) child.setup();
    if (child.nestedArray) warmUp(child);
  }
}

/** The route config names a decoded Listener's HTTP connection managers use (RDS). */
function routeNames(types, listener) {
  const found = [];
  for (const chain of listener.filter_chains || []) {
    for (const filter of chain.filters || []) {
      const packed = filter.typed_config;
      if (packed && packed.type_url === HCM) {
        const hcm = types.hcm.decode(packed.value);
        if (hcm.rds) found.push(hcm.rds.route_config_name);
      }
    }
  }
  return found;
}

/** A cluster's EDS name: its eds_cluster_config's service_name, else its name; none if not EDS. */
function edsName(cluster) {
  if (!cluster.eds_cluster_config) return null;
  return cluster.eds_cluster_config.service_name || cluster.name;
}

function sameList(a, b) {
  if (a.length !== b.length) return false;
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return false;
  return true;
}

/**
 * Stands in for a client socket's getPeerCertificate(true), which Node calls once per handshake
 * only to hand its answer to checkServerIdentity: the detailed form walks the whole chain into
 * objects with three fingerprints per certificate (1.4 ms a connection at 5,000 nodes, an eighth
 * of this process's CPU). The identity check reads only the leaf's SANs, so this gives just them.
 */
function peerSans() {
  const leaf = this.getPeerX509Certificate();
  return { subjectaltname: leaf ? leaf.subjectAltName || "" : "" };
}

function frame(type, message) {
  const body = type.encode(message).finish();
  const out = Buffer.allocUnsafe(5 + body.length);
  out[0] = 0;
  out.writeUInt32BE(body.length, 1);
  out.set(body, 5);
  return out;
}

/** One simulated node: AdsClient (meshward/testing/ads_client.py) as the fleet uses it. */
class Client {
  constructor(ctx, nodeId, secureContext) {
    this.ctx = ctx;
    this.nodeId = nodeId;
    this.secureContext = secureContext;
    this.subscriptions = new Map([
      [CLUSTER, []],
      [LISTENER, []],
    ]);
    this.views = new Map();
    this.error = null;
    this.stream = null;
    this.pending = [];
    // Derived names, kept per resource as it is received (decoded once per content).
    this.clusterEds = new Map(); // cluster name -> EDS name (or null)
    this.edsChanged = false; // since the EDS names were last compared with the subscription
    this.listenerRoutes = new Map(); // listener name -> route config names
  }

  view(typeUrl) {
    let v = this.views.get(typeUrl);
    if (v === undefined) {
      v = { version: "", names: new Set(), versions: new Map(), nonce: "", responses: 0 };
      this.views.set(typeUrl, v);
    }
    return v;
  }

  send(message) {
    const type = this.ctx.delta ? this.ctx.types.deltaRequest : this.ctx.types.request;
    const data = frame(type, message);
    if (this.stream) this.stream.write(data);
    else this.pending.push(data);
  }

  /** Change a subscription while running (SotW: the full name list; delta: adds and removes). */
  subscribe(typeUrl, names) {
    const old = this.subscriptions.get(typeUrl) || [];
    this.subscriptions.set(typeUrl, names);
    const view = this.view(typeUrl);
    if (this.ctx.delta) {
      const was = new Set(old);
      const now = new Set(names);
      this.send({
        type_url: typeUrl,
        resource_names_subscribe: names.filter((n) => !was.has(n)),
        resource_names_unsubscribe: old.filter((n) => !now.has(n)),
        response_nonce: view.nonce,
      });
    } else {
      this.send({
        type_url: typeUrl,
        version_info: view.version,
        resource_names: names,
        response_nonce: view.nonce,
      });
    }
  }

  initial(typeUrl, names) {
    const view = this.views.get(typeUrl);
    if (this.ctx.delta) {
      const versions = {};
      if (view) for (const [name, version] of view.versions) versions[name] = version;
      return { type_url: typeUrl, resource_names_subscribe: names, initial_resource_versions: versions };
    }
    return { type_url: typeUrl, version_info: view ? view.version : "", resource_names: names };
  }

  /** Open the connection and the stream; resolves when the stream ends (``error`` set if it failed). */
  run() {
    this.error = null;
    this.pending = [];
    return new Promise((resolve) => {
      let done = false;
      let session = null;
      const finish = (err) => {
        if (done) return;
        // a stream cancelled by its connection's failure: the failure (e.g. the server's identity)
        if (err && err.cause instanceof Error) err = err.cause;
        done = true;
        if (err && !this.error) this.error = err;
        this.stream = null;
        if (session) session.destroy();
        resolve();
      };
      try {
        session = http2.connect(`https://127.0.0.1:${this.ctx.port}`, {
          settings: { initialWindowSize: WINDOW },
          createConnection: () => {
            const socket = tls.connect({
              host: "127.0.0.1",
              port: this.ctx.port,
              secureContext: this.secureContext,
              ALPNProtocols: ["h2"],
              // The chain is verified against the roots by OpenSSL (rejectUnauthorized, the
              // default); SVIDs carry no DNS name, so the identity check is the URI SAN's, here.
              checkServerIdentity: (_host, cert) => this.checkServer(cert),
            });
            socket.getPeerCertificate = peerSans;
            return socket;
          },
        });
      } catch (err) {
        finish(err);
        return;
      }
      session.on("error", (err) => finish(err));
      session.on("close", () => finish(this.stream ? new Error("connection closed") : null));
      session.once("connect", () => session.setLocalWindowSize(WINDOW));
      const stream = session.request({
        ":method": "POST",
        ":scheme": "https",
        ":path": this.ctx.delta ? DELTA_METHOD : SOTW_METHOD,
        ":authority": `127.0.0.1:${this.ctx.port}`,
        te: "trailers",
        "content-type": "application/grpc",
        "user-agent": "meshward-fleet-nodes-js",
      });
      this.stream = stream;
      let first = true;
      for (const [typeUrl, names] of this.subscriptions) {
        const request = this.initial(typeUrl, names);
        if (first) {
          request.node = { id: this.nodeId, cluster: this.nodeId };
          first = false;
        }
        this.send(request);
      }
      for (const data of this.pending) stream.write(data);
      this.pending = [];
      // Received bytes not yet a whole message: chunks kept apart until one completes (a large
      // response arrives in many DATA frames; concatenating on each would be quadratic).
      let chunks = [];
      let have = 0;
      let need = -1; // the current message's length with its 5-byte prefix, once known
      let status = null;
      let message = "";
      stream.on("response", (headers) => {
        if (headers["grpc-status"] !== undefined) {
          status = headers["grpc-status"];
          message = headers["grpc-message"] || "";
        }
      });
      stream.on("trailers", (trailers) => {
        status = trailers["grpc-status"];
        message = trailers["grpc-message"] || "";
      });
      stream.on("data", (chunk) => {
        chunks.push(chunk);
        have += chunk.length;
        while (have >= 5) {
          if (need < 0) {
            const head = chunks[0].length >= 5 ? chunks[0] : Buffer.concat(chunks);
            need = 5 + head.readUInt32BE(1);
          }
          if (have < need) break;
          const all = chunks.length === 1 ? chunks[0] : Buffer.concat(chunks, have);
          const body = all.subarray(5, need);
          chunks = have > need ? [all.subarray(need)] : [];
          have -= need;
          need = -1;
          try {
            this.apply(body);
          } catch (err) {
            finish(err);
            return;
          }
        }
      });
      stream.on("error", (err) => finish(err));
      stream.on("close", () => {
        if (status !== null && String(status) !== "0") {
          finish(new GRPCError(`status ${status}: ${decodeURIComponent(message)}`));
        } else if (status === null) {
          finish(new Error(`stream closed without a status (code ${stream.rstCode})`));
        } else {
          this.stream = null;
          finish(null);
        }
      });
    });
  }

  checkServer(cert) {
    const identity = this.ctx.identity;
    if (identity === null) return undefined;
    const uris = (cert.subjectaltname || "")
      .split(", ")
      .filter((s) => s.startsWith("URI:"))
      .map((s) => s.slice(4));
    if (!uris.includes(identity)) {
      return new ServerIdentityMismatch(`server presented ${JSON.stringify(uris)}, expected ${identity}`);
    }
    return undefined;
  }

  /** Decode every resource to its type (as Envoy does before it ACKs); null, or why not. */
  decode(typeUrl, resources) {
    const type = this.ctx.types.byUrl.get(typeUrl);
    if (type === undefined) return { error: `cannot decode a ${typeUrl}` };
    const decoded = [];
    for (const item of resources) {
      const packed = this.ctx.delta ? item.resource : item; // delta: a Resource wrapping the Any
      if (!packed || packed.type_url !== typeUrl) return { error: `cannot decode a ${typeUrl}` };
      try {
        decoded.push(type.decode(packed.value));
      } catch (err) {
        return { error: `cannot decode a ${typeUrl}: ${err.message}` };
      }
    }
    return { decoded };
  }

  apply(body) {
    const ctx = this.ctx;
    const response = (ctx.delta ? ctx.types.deltaResponse : ctx.types.response).decode(body);
    const typeUrl = response.type_url;
    const view = this.view(typeUrl);
    const resources = response.resources || [];
    const { error, decoded } = this.decode(typeUrl, resources);
    let request;
    if (ctx.delta) {
      if (!error) {
        resources.forEach((r, i) => {
          view.names.add(r.name);
          view.versions.set(r.name, r.version);
          this.derive(typeUrl, r.name, decoded[i]);
        });
        for (const name of response.removed_resources || []) {
          view.names.delete(name);
          view.versions.delete(name);
          if (this.clusterEds.delete(name)) this.edsChanged = true;
          this.listenerRoutes.delete(name);
        }
        view.version = response.system_version_info;
      }
      request = { type_url: typeUrl, response_nonce: response.nonce };
    } else {
      if (!error) {
        view.names = new Set();
        if (typeUrl === CLUSTER) {
          this.clusterEds = new Map();
          this.edsChanged = true;
        }
        if (typeUrl === LISTENER) this.listenerRoutes = new Map();
        decoded.forEach((message, i) => {
          const name = message.name || message.cluster_name || "";
          view.names.add(name);
          this.derive(typeUrl, name, message);
        });
        view.version = response.version_info;
      }
      request = {
        type_url: typeUrl,
        version_info: view.version,
        resource_names: this.subscriptions.get(typeUrl) || [],
        response_nonce: response.nonce,
      };
    }
    if (error) request.error_detail = { code: 3, message: error };
    view.nonce = response.nonce;
    view.responses += 1;
    this.send(request);
    if (typeUrl === LISTENER && !error) {
      const names = [...new Set([].concat(...this.listenerRoutes.values()))].sort();
      if (!sameList(names, this.subscriptions.get(ROUTE) || [])) this.subscribe(ROUTE, names);
    }
    ctx.onResponse(this, typeUrl, response);
  }

  derive(typeUrl, name, message) {
    if (typeUrl === CLUSTER) {
      const eds = edsName(message);
      if (this.clusterEds.get(name) !== eds || !this.clusterEds.has(name)) this.edsChanged = true;
      this.clusterEds.set(name, eds);
    }
    else if (typeUrl === LISTENER) this.listenerRoutes.set(name, routeNames(this.ctx.types, message));
  }

  configured() {
    const has = (t) => this.views.has(t) && this.views.get(t).responses > 0;
    return (
      has(CLUSTER) &&
      has(LISTENER) &&
      has(ROUTE) &&
      (!(this.subscriptions.get(ENDPOINT) || []).length || has(ENDPOINT))
    );
  }

  close() {
    if (this.stream) this.stream.close();
  }
}

function errorKind(err) {
  const text = String(err.message || err);
  return `${err.name || "Error"}: ${text.slice(0, 100)}`;
}

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
