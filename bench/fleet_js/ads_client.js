"use strict";
/*
 * One simulated ADS node for bench/fleet_js/fleet_nodes.js: meshward/testing/ads_client.py's
 * AdsClient as the fleet uses it, over Node's `tls` and `http2` (one connection per node, gRPC's
 * 5-byte framing), with the message types protobufjs builds from the FileDescriptorSet the
 * bench exports (WORK/descriptors.pb). Kept apart from the process's control protocol so each
 * file reads on its own.
 */

const fs = require("fs");
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

module.exports = {
  CLUSTER, ENDPOINT, LISTENER, ROUTE, ORDER, PROBE_NAME, MAX_PROBE_WAITS, USAGE,
  Client, loadTypes, warmUp, sameList, errorKind, wallNow, monoNow, sleep,
};
