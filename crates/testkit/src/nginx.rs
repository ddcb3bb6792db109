//! nginx (Debian's, with its njs module) as a CDN edge: a caching reverse
//! proxy in front of an object store that serves only URLs whose HMAC token
//! verifies (`media.cdn.mode = "hmac"`), reading from the origin with the
//! origin secret header, and adding `X-Content-Type-Options: nosniff`.

use std::process::{Command, Stdio};

use crate::{Process, free_port, wait_listening};

/// Where Debian's `libnginx-mod-http-js` puts the module.
const NJS_MODULE: &str = "/usr/lib/nginx/modules/ngx_http_js_module.so";

pub struct CdnEdge {
    _process: Process,
    port: u16,
    _dir: tempfile::TempDir,
}

/// What the edge checks, as njs: the expiry, then the token over expiry and path.
const VERIFY_JS: &str = r#"
const crypto = require('crypto');
function valid(r) {
    const expires = r.args.expires;
    const token = r.args.token;
    if (!expires || !token || !/^[0-9]+$/.test(expires)) return "0";
    if (Number(expires) < Math.floor(Date.now() / 1000)) return "0";
    const expected = crypto.createHmac('sha256', process.env.CDN_SECRET).update(expires + r.uri).digest('base64url');
    return expected === token ? "1" : "0";
}
export default { valid };
"#;

impl CdnEdge {
    /// Serves `/{path_prefix}/{key}` from `origin` (`http://host:port`) bucket `bucket`.
    pub fn start(origin: &str, bucket: &str, path_prefix: &str, secret: &str, origin_secret: &str) -> Self {
        let dir = tempfile::tempdir().expect("temporary directory");
        let port = free_port();
        let root = dir.path().display().to_string();
        std::fs::write(dir.path().join("verify.js"), VERIFY_JS).expect("write verify.js");
        let config = format!(
            r#"load_module {NJS_MODULE};
worker_processes 1;
daemon off;
master_process off;
pid {root}/nginx.pid;
error_log {root}/error.log warn;
env CDN_SECRET;
events {{ worker_connections 64; }}
http {{
    access_log {root}/access.log;
    client_body_temp_path {root}/body;
    proxy_temp_path {root}/proxy;
    fastcgi_temp_path {root}/fastcgi;
    uwsgi_temp_path {root}/uwsgi;
    scgi_temp_path {root}/scgi;
    js_import verify from {root}/verify.js;
    js_set $token_valid verify.valid;
    proxy_cache_path {root}/cache keys_zone=media:1m max_size=256m;
    server {{
        listen 127.0.0.1:{port};
        location /{path_prefix}/ {{
            if ($token_valid != "1") {{ return 403; }}
            proxy_pass {origin}/{bucket}/;
            proxy_set_header x-messenger-origin-secret "{origin_secret}";
            proxy_cache media;
            proxy_cache_key $uri;
            proxy_cache_valid 200 10m;
            proxy_ignore_headers Cache-Control Expires Set-Cookie;
            add_header X-Cache-Status $upstream_cache_status always;
            add_header X-Content-Type-Options nosniff always;
        }}
    }}
}}
"#
        );
        let config_path = dir.path().join("nginx.conf");
        std::fs::write(&config_path, config).expect("write nginx.conf");
        let child = Command::new("nginx")
            .arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(&config_path)
            .env("CDN_SECRET", secret)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nginx not found: run scripts/setup.sh");
        wait_listening(port, "nginx");
        Self { _process: Process(Some(child)), port, _dir: dir }
    }

    pub fn base_url(&self, path_prefix: &str) -> String {
        format!("http://127.0.0.1:{}/{path_prefix}", self.port)
    }
}
