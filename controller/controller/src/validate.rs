//! Semantic checks beyond the schema, with the field path of the first problem.
//! Anything that passes here compiles; anything that fails never reaches the store.

use std::{net::IpAddr, time::Duration};

use ipnet::IpNet;

use crate::{
    decode::Warning,
    resources::{
        Object,
        gateway::{self, WAYPOINT_CLASS},
        istio::{self, AuthorizationAction},
    },
};

/// A field that makes an object invalid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub path: String,
    pub message: String,
}

fn fail<T>(path: impl Into<String>, message: impl Into<String>) -> Result<T, FieldError> {
    Err(FieldError {
        path: path.into(),
        message: message.into(),
    })
}

/// Validates one object; returns warnings for things that apply but deserve a look.
pub fn validate(object: &Object) -> Result<Vec<Warning>, FieldError> {
    let mut warnings = Vec::new();
    match object {
        Object::Pod(pod) => {
            if let Some(ip) = pod.status.as_ref().and_then(|s| s.pod_ip.as_deref()) {
                ip.parse::<IpAddr>()
                    .or_else(|_| fail("status.podIP", format!("{ip:?} is not an IP address")))?;
            }
        }
        Object::Service(svc) => {
            if let Some(spec) = &svc.spec {
                for (i, ip) in spec.cluster_ips.iter().flatten().enumerate() {
                    if ip != "None" && ip.parse::<IpAddr>().is_err() {
                        return fail(
                            format!("spec.clusterIPs[{i}]"),
                            format!("{ip:?} is not an IP address"),
                        );
                    }
                }
                if let Some(ip) = spec.cluster_ip.as_deref()
                    && ip != "None"
                    && !ip.is_empty()
                    && ip.parse::<IpAddr>().is_err()
                {
                    return fail("spec.clusterIP", format!("{ip:?} is not an IP address"));
                }
            }
        }
        Object::AuthorizationPolicy(p) => authorization_policy(&p.spec)?,
        Object::PeerAuthentication(p) => {
            for port in p.spec.port_level_mtls.keys() {
                if *port == 0 || *port > 65535 {
                    return fail(format!("spec.portLevelMtls.{port}"), "port must be 1-65535");
                }
            }
            if !p.spec.port_level_mtls.is_empty() && p.spec.selector.is_none() {
                return fail(
                    "spec.portLevelMtls",
                    "portLevelMtls requires a workload selector (as in Istio)",
                );
            }
        }
        Object::VirtualService(vs) => virtual_service(&vs.spec, &mut warnings)?,
        Object::DestinationRule(dr) => destination_rule(&dr.spec)?,
        Object::ServiceEntry(se) => service_entry(&se.spec)?,
        Object::Gateway(gw) => gateway_spec(&gw.spec, &mut warnings)?,
        Object::HttpRoute(r) => http_route(&r.spec)?,
        Object::GrpcRoute(r) => grpc_route(&r.spec)?,
        Object::Namespace(_)
        | Object::Node(_)
        | Object::EndpointSlice(_)
        | Object::ServiceAccount(_)
        | Object::RequestAuthentication(_) => {}
    }
    Ok(warnings)
}

/// Parses a duration the way Istio's API does ("1h", "1.5s", "250ms", "2m30s").
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("{s:?} is not a duration (write e.g. \"250ms\", \"5s\", \"1m30s\")");
    if s.is_empty() {
        return Err(bad());
    }
    let mut total = 0f64;
    let mut rest = s;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(bad)?;
        if num_len == 0 {
            return Err(bad());
        }
        let value: f64 = rest[..num_len].parse().map_err(|_| bad())?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" => 1e-6,
            "ns" => 1e-9,
            _ => return Err(bad()),
        };
        total += value * scale;
        rest = &rest[unit_len..];
    }
    Duration::try_from_secs_f64(total).map_err(|_| bad())
}

/// Parses an `ipBlocks` entry: a CIDR or a bare address (a /32 or /128).
pub fn parse_ip_block(s: &str) -> Result<IpNet, String> {
    if let Ok(net) = s.parse::<IpNet>() {
        return Ok(net);
    }
    s.parse::<IpAddr>()
        .map(IpNet::from)
        .map_err(|_| format!("{s:?} is neither an IP address nor a CIDR"))
}

/// Checks an Istio string-match pattern: exact, "*", "prefix*" or "*suffix".
fn pattern(path: String, s: &str) -> Result<(), FieldError> {
    let stars = s.matches('*').count();
    let ok =
        !s.is_empty() && (stars == 0 || (stars == 1 && (s.starts_with('*') || s.ends_with('*'))));
    if ok {
        Ok(())
    } else {
        fail(
            path,
            format!("{s:?}: use an exact value, \"*\", \"prefix*\" or \"*suffix\""),
        )
    }
}

fn port_str(path: String, s: &str) -> Result<u16, FieldError> {
    match s.parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => fail(path, format!("{s:?} is not a port number (1-65535)")),
    }
}

/// `when` keys that ztunnel can evaluate at L4.
pub const L4_CONDITION_KEYS: &[&str] = &[
    "source.ip",
    "source.namespace",
    "source.principal",
    "remote.ip",
    "destination.ip",
    "destination.port",
];

/// `when` key prefixes that need a waypoint (L7).
const L7_CONDITION_PREFIXES: &[&str] = &[
    "request.",
    "source.serviceAccount",
    "destination.serviceAccount",
    "connection.sni",
    "experimental.",
];

fn authorization_policy(spec: &istio::AuthorizationPolicySpec) -> Result<(), FieldError> {
    let targets = usize::from(spec.target_ref.is_some()) + spec.target_refs.len();
    if spec.selector.is_some() && targets > 0 {
        return fail(
            "spec.selector",
            "selector and targetRef(s) are mutually exclusive",
        );
    }
    if spec.action == AuthorizationAction::Custom && spec.provider.is_none() {
        return fail("spec.provider", "action CUSTOM requires a provider");
    }
    for (i, rule) in spec.rules.iter().flatten().enumerate() {
        for (j, from) in rule.from.iter().enumerate() {
            let s = &from.source;
            let base = format!("spec.rules[{i}].from[{j}].source");
            for (field, values) in [
                ("principals", &s.principals),
                ("notPrincipals", &s.not_principals),
                ("requestPrincipals", &s.request_principals),
                ("notRequestPrincipals", &s.not_request_principals),
                ("namespaces", &s.namespaces),
                ("notNamespaces", &s.not_namespaces),
            ] {
                for (k, v) in values.iter().enumerate() {
                    pattern(format!("{base}.{field}[{k}]"), v)?;
                }
            }
            for (field, values) in [
                ("ipBlocks", &s.ip_blocks),
                ("notIpBlocks", &s.not_ip_blocks),
                ("remoteIpBlocks", &s.remote_ip_blocks),
                ("notRemoteIpBlocks", &s.not_remote_ip_blocks),
            ] {
                for (k, v) in values.iter().enumerate() {
                    parse_ip_block(v).or_else(|m| fail(format!("{base}.{field}[{k}]"), m))?;
                }
            }
            for (field, values) in [
                ("serviceAccounts", &s.service_accounts),
                ("notServiceAccounts", &s.not_service_accounts),
            ] {
                for (k, v) in values.iter().enumerate() {
                    if v.split('/').count() != 2 || v.contains('*') {
                        return fail(
                            format!("{base}.{field}[{k}]"),
                            format!("{v:?}: write <namespace>/<service-account>"),
                        );
                    }
                }
            }
        }
        for (j, to) in rule.to.iter().enumerate() {
            let o = &to.operation;
            let base = format!("spec.rules[{i}].to[{j}].operation");
            for (field, values) in [("ports", &o.ports), ("notPorts", &o.not_ports)] {
                for (k, v) in values.iter().enumerate() {
                    port_str(format!("{base}.{field}[{k}]"), v)?;
                }
            }
        }
        for (j, cond) in rule.when.iter().enumerate() {
            let base = format!("spec.rules[{i}].when[{j}]");
            if cond.values.is_empty() && cond.not_values.is_empty() {
                return fail(base, "a condition needs values or notValues");
            }
            let key = cond.key.as_str();
            let known = L4_CONDITION_KEYS.contains(&key)
                || L7_CONDITION_PREFIXES.iter().any(|p| key.starts_with(p));
            if !known {
                return fail(
                    format!("{base}.key"),
                    format!("unknown condition key {key:?}"),
                );
            }
            for (k, v) in cond.values.iter().chain(&cond.not_values).enumerate() {
                match key {
                    "source.ip" | "remote.ip" | "destination.ip" => {
                        parse_ip_block(v).or_else(|m| fail(format!("{base}.values[{k}]"), m))?;
                    }
                    "destination.port" => {
                        port_str(format!("{base}.values[{k}]"), v)?;
                    }
                    _ => {}
                }
            }
        }
    }
    Ok(())
}

fn duration(path: String, s: &Option<String>) -> Result<(), FieldError> {
    if let Some(s) = s {
        parse_duration(s).or_else(|m| fail(path, m))?;
    }
    Ok(())
}

fn string_match(path: String, m: &istio::StringMatch) -> Result<(), FieldError> {
    let set = [&m.exact, &m.prefix, &m.regex]
        .iter()
        .filter(|v| v.is_some())
        .count();
    if set != 1 {
        return fail(path, "set exactly one of exact, prefix, regex");
    }
    if let Some(re) = &m.regex {
        regex::Regex::new(re).or_else(|e| fail(format!("{path}.regex"), e.to_string()))?;
    }
    Ok(())
}

/// What a waypoint needs to build a `Location` from an Istio `HTTPRedirect`.
fn redirect(base: &str, r: &istio::HttpRedirect) -> Result<(), FieldError> {
    if r.port.is_some_and(|p| p == 0 || p > 65535) {
        return fail(format!("{base}.port"), "port must be 1-65535");
    }
    if let Some(s) = &r.scheme {
        let mut chars = s.chars();
        let valid = chars.next().is_some_and(|c| c.is_ascii_alphabetic())
            && chars.all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c));
        if !valid {
            return fail(
                format!("{base}.scheme"),
                format!("{s:?} is not a URI scheme"),
            );
        }
    }
    if let Some(u) = &r.uri
        && !u.starts_with('/')
    {
        return fail(
            format!("{base}.uri"),
            format!("{u:?} is not a path (starts with /)"),
        );
    }
    if let Some(code) = r.redirect_code
        && !(300..=399).contains(&code)
    {
        return fail(
            format!("{base}.redirectCode"),
            format!("{code} is not a redirect status (3xx)"),
        );
    }
    Ok(())
}

fn virtual_service(
    spec: &istio::VirtualServiceSpec,
    warnings: &mut Vec<Warning>,
) -> Result<(), FieldError> {
    if spec.hosts.is_empty() {
        return fail("spec.hosts", "at least one host is required");
    }
    for (i, route) in spec.http.iter().enumerate() {
        let base = format!("spec.http[{i}]");
        for (j, m) in route.matches.iter().enumerate() {
            let mbase = format!("{base}.match[{j}]");
            if m.port.is_some_and(|p| p == 0 || p > 65535) {
                return fail(format!("{mbase}.port"), "port must be 1-65535");
            }
            for (name, sm) in [
                ("uri", &m.uri),
                ("scheme", &m.scheme),
                ("method", &m.method),
                ("authority", &m.authority),
            ] {
                if let Some(sm) = sm {
                    string_match(format!("{mbase}.{name}"), sm)?;
                }
            }
            for (name, map) in [
                ("headers", &m.headers),
                ("queryParams", &m.query_params),
                ("withoutHeaders", &m.without_headers),
            ] {
                for (key, sm) in map {
                    // An empty match ({}) on headers means "present".
                    if sm != &istio::StringMatch::default() {
                        string_match(format!("{mbase}.{name}.{key}"), sm)?;
                    }
                }
            }
        }
        let actions = usize::from(!route.route.is_empty())
            + usize::from(route.redirect.is_some())
            + usize::from(route.direct_response.is_some());
        if actions != 1 {
            return fail(base, "set exactly one of route, redirect, directResponse");
        }
        if let Some(r) = &route.redirect {
            redirect(&format!("{base}.redirect"), r)?;
        }
        if let Some(rw) = &route.rewrite
            && let Some(re) = &rw.uri_regex_rewrite
        {
            if rw.uri.is_some() {
                return fail(
                    format!("{base}.rewrite"),
                    "set at most one of uri, uriRegexRewrite",
                );
            }
            regex::Regex::new(&re.match_).or_else(|e| {
                fail(
                    format!("{base}.rewrite.uriRegexRewrite.match"),
                    e.to_string(),
                )
            })?;
        }
        let mut total = 0i64;
        for (j, dst) in route.route.iter().enumerate() {
            if dst.destination.host.is_empty() {
                return fail(format!("{base}.route[{j}].destination.host"), "required");
            }
            match dst.weight {
                Some(w) if w < 0 => {
                    return fail(format!("{base}.route[{j}].weight"), "must not be negative");
                }
                Some(w) => total += i64::from(w),
                None => {}
            }
        }
        if route.route.len() > 1 && total == 0 {
            warnings.push(Warning {
                path: format!("{base}.route"),
                message: "several destinations without weights: traffic goes to the first".into(),
            });
        }
        duration(format!("{base}.timeout"), &route.timeout)?;
        if let Some(r) = &route.retries {
            duration(format!("{base}.retries.perTryTimeout"), &r.per_try_timeout)?;
            if r.attempts < 0 {
                return fail(format!("{base}.retries.attempts"), "must not be negative");
            }
        }
        if let Some(f) = &route.fault {
            if let Some(d) = &f.delay {
                if d.fixed_delay.is_none() {
                    return fail(format!("{base}.fault.delay.fixedDelay"), "required");
                }
                duration(format!("{base}.fault.delay.fixedDelay"), &d.fixed_delay)?;
                percent(format!("{base}.fault.delay.percentage"), &d.percentage)?;
            }
            if let Some(a) = &f.abort {
                if a.http_status.is_none() && a.grpc_status.is_none() {
                    return fail(
                        format!("{base}.fault.abort"),
                        "set httpStatus or grpcStatus",
                    );
                }
                if let Some(code) = a.http_status
                    && !(200..=599).contains(&code)
                {
                    return fail(
                        format!("{base}.fault.abort.httpStatus"),
                        format!("{code} is not an HTTP status (200-599)"),
                    );
                }
                percent(format!("{base}.fault.abort.percentage"), &a.percentage)?;
            }
        }
        percent(format!("{base}.mirrorPercentage"), &route.mirror_percentage)?;
        if let Some(c) = &route.cors_policy {
            cors_policy(&format!("{base}.corsPolicy"), c)?;
        }
    }
    Ok(())
}

/// What a waypoint needs to answer preflights: matchable origins, methods and header
/// names it can send, a max age that parses.
fn cors_policy(base: &str, c: &istio::CorsPolicy) -> Result<(), FieldError> {
    for (i, m) in c.allow_origins.iter().enumerate() {
        string_match(format!("{base}.allowOrigins[{i}]"), m)?;
    }
    methods(base, &c.allow_methods)?;
    header_names(
        base,
        &[
            ("allowHeaders", &c.allow_headers),
            ("exposeHeaders", &c.expose_headers),
        ],
    )?;
    // Sent in seconds: Istio refuses a fraction rather than round it.
    match c.max_age.as_deref().map(parse_duration) {
        Some(Err(m)) => fail(format!("{base}.maxAge"), m),
        Some(Ok(d)) if d.subsec_nanos() != 0 => fail(
            format!("{base}.maxAge"),
            format!("{d:?} is not a whole number of seconds"),
        ),
        _ => Ok(()),
    }
}

fn percent(path: String, p: &Option<istio::Percent>) -> Result<(), FieldError> {
    match p {
        Some(p) if !(0.0..=100.0).contains(&p.value) => {
            fail(path, format!("{} is not a percentage (0-100)", p.value))
        }
        _ => Ok(()),
    }
}

fn traffic_policy(base: &str, tp: &Option<istio::TrafficPolicy>) -> Result<(), FieldError> {
    let Some(tp) = tp else { return Ok(()) };
    pool_and_outliers(base, &tp.connection_pool, &tp.outlier_detection)?;
    let mut ports = std::collections::BTreeSet::new();
    for (i, p) in tp.port_level_settings.iter().enumerate() {
        let at = format!("{base}.portLevelSettings[{i}]");
        match p.port.as_ref().map(|p| p.number) {
            None => return fail(format!("{at}.port"), "required"),
            Some(n) if n == 0 || n > 65535 => {
                return fail(format!("{at}.port.number"), "port must be 1-65535");
            }
            Some(n) if !ports.insert(n) => {
                return fail(
                    format!("{at}.port.number"),
                    format!("port {n} is listed twice"),
                );
            }
            Some(_) => {}
        }
        pool_and_outliers(&at, &p.connection_pool, &p.outlier_detection)?;
    }
    Ok(())
}

/// The durations of a connection pool and an outlier detection.
fn pool_and_outliers(
    base: &str,
    pool: &Option<istio::ConnectionPoolSettings>,
    outliers: &Option<istio::OutlierDetection>,
) -> Result<(), FieldError> {
    if let Some(cp) = pool
        && let Some(tcp) = &cp.tcp
    {
        duration(
            format!("{base}.connectionPool.tcp.connectTimeout"),
            &tcp.connect_timeout,
        )?;
    }
    if let Some(cp) = pool
        && let Some(http) = &cp.http
    {
        duration(
            format!("{base}.connectionPool.http.idleTimeout"),
            &http.idle_timeout,
        )?;
    }
    if let Some(od) = outliers {
        duration(format!("{base}.outlierDetection.interval"), &od.interval)?;
        duration(
            format!("{base}.outlierDetection.baseEjectionTime"),
            &od.base_ejection_time,
        )?;
    }
    Ok(())
}

fn destination_rule(spec: &istio::DestinationRuleSpec) -> Result<(), FieldError> {
    if spec.host.is_empty() {
        return fail("spec.host", "required");
    }
    traffic_policy("spec.trafficPolicy", &spec.traffic_policy)?;
    let mut seen = std::collections::BTreeSet::new();
    for (i, s) in spec.subsets.iter().enumerate() {
        if s.name.is_empty() || !seen.insert(&s.name) {
            return fail(
                format!("spec.subsets[{i}].name"),
                "subset names must be set and unique",
            );
        }
        traffic_policy(
            &format!("spec.subsets[{i}].trafficPolicy"),
            &s.traffic_policy,
        )?;
    }
    Ok(())
}

fn service_entry(spec: &istio::ServiceEntrySpec) -> Result<(), FieldError> {
    if spec.hosts.is_empty() {
        return fail("spec.hosts", "at least one host is required");
    }
    for (i, a) in spec.addresses.iter().enumerate() {
        parse_ip_block(a).or_else(|m| fail(format!("spec.addresses[{i}]"), m))?;
    }
    for (i, p) in spec.ports.iter().enumerate() {
        if p.number == 0 || p.number > 65535 {
            return fail(format!("spec.ports[{i}].number"), "port must be 1-65535");
        }
        if let Some(t) = p.target_port
            && (t == 0 || t > 65535)
        {
            return fail(
                format!("spec.ports[{i}].targetPort"),
                "port must be 1-65535",
            );
        }
    }
    for (i, e) in spec.endpoints.iter().enumerate() {
        if let Some(a) = &e.address
            && a.parse::<IpAddr>().is_err()
            && !a.starts_with("unix://")
            && a.contains(':')
        {
            return fail(
                format!("spec.endpoints[{i}].address"),
                format!("{a:?} is not an IP address or hostname"),
            );
        }
    }
    Ok(())
}

fn gateway_spec(
    spec: &gateway::GatewaySpec,
    warnings: &mut Vec<Warning>,
) -> Result<(), FieldError> {
    for (i, l) in spec.listeners.iter().enumerate() {
        if l.port == 0 || l.port > 65535 {
            return fail(format!("spec.listeners[{i}].port"), "port must be 1-65535");
        }
    }
    if spec.gateway_class_name == WAYPOINT_CLASS
        && !spec
            .listeners
            .iter()
            .any(|l| l.port == u32::from(cairn_api::HBONE_PORT) && l.protocol == "HBONE")
    {
        warnings.push(Warning {
            path: "spec.listeners".into(),
            message: "a waypoint needs a listener with port 15008 and protocol HBONE".into(),
        });
    }
    Ok(())
}

fn http_route(spec: &gateway::HTTPRouteSpec) -> Result<(), FieldError> {
    if spec.parent_refs.is_empty() {
        return fail(
            "spec.parentRefs",
            "at least one parent (Service or Gateway) is required",
        );
    }
    for (i, rule) in spec.rules.iter().enumerate() {
        if let Some(t) = &rule.timeouts {
            duration(format!("spec.rules[{i}].timeouts.request"), &t.request)?;
            duration(
                format!("spec.rules[{i}].timeouts.backendRequest"),
                &t.backend_request,
            )?;
        }
        for (j, f) in rule.filters.iter().enumerate() {
            if let Some(c) = &f.cors {
                cors_filter(&format!("spec.rules[{i}].filters[{j}].cors"), c)?;
            }
        }
        for (j, m) in rule.matches.iter().enumerate() {
            if let Some(p) = &m.path
                && p.type_.as_deref() == Some("RegularExpression")
                && let Some(v) = &p.value
            {
                regex::Regex::new(v).or_else(|e| {
                    fail(
                        format!("spec.rules[{i}].matches[{j}].path.value"),
                        e.to_string(),
                    )
                })?;
            }
        }
    }
    Ok(())
}

/// The API's rules for a `CORS` filter: origins `*` or `http(s)://host[:port]`,
/// method and header names a waypoint can send, `maxAge` at least 1.
fn cors_filter(base: &str, c: &gateway::HttpCorsFilter) -> Result<(), FieldError> {
    for (i, o) in c.allow_origins.iter().enumerate() {
        let host = o
            .strip_prefix("https://")
            .or_else(|| o.strip_prefix("http://"));
        let valid = o == "*"
            || host.is_some_and(|h| {
                let (name, port) = h.rsplit_once(':').unwrap_or((h, "1"));
                !name.is_empty()
                    && name
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-.*".contains(&b))
                    && port.parse::<u16>().is_ok_and(|p| p > 0)
            });
        if !valid {
            return fail(
                format!("{base}.allowOrigins[{i}]"),
                format!("{o:?} is not * or <http|https>://<host>[:<port>]"),
            );
        }
    }
    methods(base, &c.allow_methods)?;
    header_names(
        base,
        &[
            ("allowHeaders", &c.allow_headers),
            ("exposeHeaders", &c.expose_headers),
        ],
    )?;
    if c.max_age.is_some_and(|a| a < 1) {
        return fail(format!("{base}.maxAge"), "must be at least 1 (seconds)");
    }
    Ok(())
}

/// `allowMethods` entries must be HTTP methods (`*` is a token, so it is one).
fn methods(base: &str, list: &[String]) -> Result<(), FieldError> {
    for (i, m) in list.iter().enumerate() {
        if http::Method::from_bytes(m.as_bytes()).is_err() {
            return fail(
                format!("{base}.allowMethods[{i}]"),
                format!("{m:?} is not an HTTP method"),
            );
        }
    }
    Ok(())
}

/// Each list's entries must be header names (`*` is one).
fn header_names(base: &str, lists: &[(&str, &Vec<String>)]) -> Result<(), FieldError> {
    for (field, names) in lists {
        for (i, name) in names.iter().enumerate() {
            if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                return fail(
                    format!("{base}.{field}[{i}]"),
                    format!("{name:?} is not a header name"),
                );
            }
        }
    }
    Ok(())
}

fn grpc_route(spec: &gateway::GRPCRouteSpec) -> Result<(), FieldError> {
    if spec.parent_refs.is_empty() {
        return fail(
            "spec.parentRefs",
            "at least one parent (Service or Gateway) is required",
        );
    }
    for (i, rule) in spec.rules.iter().enumerate() {
        for (j, m) in rule.matches.iter().enumerate() {
            let Some(method) = &m.method else { continue };
            let path = format!("spec.rules[{i}].matches[{j}].method");
            match method.type_.as_deref() {
                None | Some("Exact") => {
                    if method.service.is_none() && method.method.is_none() {
                        return fail(path, "an Exact method match needs service, method or both");
                    }
                }
                Some("RegularExpression") => {
                    for v in [&method.service, &method.method].into_iter().flatten() {
                        regex::Regex::new(v).or_else(|e| fail(path.clone(), e.to_string()))?;
                    }
                }
                Some(other) => {
                    return fail(
                        format!("{path}.type"),
                        format!("{other:?}: write Exact or RegularExpression"),
                    );
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        for bad in ["", "5", "s", "5x", "-1s", "1s5"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} should fail");
        }
    }

    #[test]
    fn ip_blocks_and_patterns() {
        assert_eq!(
            parse_ip_block("10.0.0.0/8").expect("cidr").to_string(),
            "10.0.0.0/8"
        );
        assert_eq!(
            parse_ip_block("10.1.2.3").expect("ip").to_string(),
            "10.1.2.3/32"
        );
        assert!(parse_ip_block("10.0.0.0/40").is_err());
        for ok in ["*", "cluster.local/*", "*/sa/foo", "exact"] {
            assert!(pattern("p".into(), ok).is_ok(), "{ok}");
        }
        for bad in ["a*b", "**", "*a*", ""] {
            assert!(pattern("p".into(), bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn virtual_service_match_ports_and_redirects_are_checked() {
        let with = |m: istio::HttpMatchRequest, r: istio::HttpRedirect| istio::VirtualServiceSpec {
            hosts: vec!["reviews".into()],
            http: vec![istio::HttpRoute {
                matches: vec![m],
                redirect: Some(r),
                ..Default::default()
            }],
            ..Default::default()
        };
        let check = |spec: &istio::VirtualServiceSpec| virtual_service(spec, &mut Vec::new());
        let good = istio::HttpRedirect {
            scheme: Some("https".into()),
            port: Some(8443),
            uri: Some("/login".into()),
            redirect_code: Some(308),
            ..Default::default()
        };
        assert!(check(&with(Default::default(), good.clone())).is_ok());
        let port = istio::HttpMatchRequest {
            port: Some(70000),
            ..Default::default()
        };
        let e = check(&with(port, good.clone())).expect_err("match port");
        assert_eq!(e.path, "spec.http[0].match[0].port");
        for (bad, field) in [
            (
                istio::HttpRedirect {
                    scheme: Some("ht tp".into()),
                    ..good.clone()
                },
                "scheme",
            ),
            (
                istio::HttpRedirect {
                    uri: Some("login".into()),
                    ..good.clone()
                },
                "uri",
            ),
            (
                istio::HttpRedirect {
                    redirect_code: Some(200),
                    ..good.clone()
                },
                "redirectCode",
            ),
            (
                istio::HttpRedirect {
                    port: Some(0),
                    ..good.clone()
                },
                "port",
            ),
        ] {
            let e = check(&with(Default::default(), bad)).expect_err(field);
            assert_eq!(e.path, format!("spec.http[0].redirect.{field}"));
        }
    }

    #[test]
    fn port_level_settings_need_distinct_ports_and_valid_durations() {
        let with = |ports: &[Option<u32>], timeout: &str| istio::DestinationRuleSpec {
            host: "reviews".into(),
            traffic_policy: Some(istio::TrafficPolicy {
                port_level_settings: ports
                    .iter()
                    .map(|p| istio::PortTrafficPolicy {
                        port: p.map(|number| istio::PortSelector { number }),
                        outlier_detection: Some(istio::OutlierDetection {
                            base_ejection_time: Some(timeout.into()),
                            ..Default::default()
                        }),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert!(destination_rule(&with(&[Some(9080), Some(9090)], "30s")).is_ok());
        for (spec, path) in [
            (
                with(&[None], "30s"),
                "spec.trafficPolicy.portLevelSettings[0].port",
            ),
            (
                with(&[Some(9080), Some(9080)], "30s"),
                "spec.trafficPolicy.portLevelSettings[1].port.number",
            ),
            (
                with(&[Some(70000)], "30s"),
                "spec.trafficPolicy.portLevelSettings[0].port.number",
            ),
            (
                with(&[Some(9080)], "soon"),
                "spec.trafficPolicy.portLevelSettings[0].outlierDetection.baseEjectionTime",
            ),
        ] {
            assert_eq!(destination_rule(&spec).expect_err(path).path, path);
        }
    }

    /// A VirtualService for `reviews` whose one route is `route`, sent to `reviews`.
    fn to_reviews(route: istio::HttpRoute) -> istio::VirtualServiceSpec {
        istio::VirtualServiceSpec {
            hosts: vec!["reviews".into()],
            http: vec![istio::HttpRoute {
                route: vec![istio::HttpRouteDestination {
                    destination: istio::Destination {
                        host: "reviews".into(),
                        ..Default::default()
                    },
                    ..Default::default()
                }],
                ..route
            }],
            ..Default::default()
        }
    }

    #[test]
    fn a_regex_rewrite_needs_a_valid_regex_and_no_uri() {
        let with = |uri: Option<&str>, re: &str| {
            to_reviews(istio::HttpRoute {
                rewrite: Some(istio::HttpRewrite {
                    uri: uri.map(Into::into),
                    uri_regex_rewrite: Some(istio::RegexRewrite {
                        match_: re.into(),
                        rewrite: "/\\1".into(),
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            })
        };
        let check = |spec: &istio::VirtualServiceSpec| virtual_service(spec, &mut Vec::new());
        assert!(check(&with(None, "^/v1/(.*)$")).is_ok());
        assert_eq!(
            check(&with(None, "([")).expect_err("regex").path,
            "spec.http[0].rewrite.uriRegexRewrite.match"
        );
        assert_eq!(
            check(&with(Some("/x"), "^/v1/(.*)$"))
                .expect_err("both")
                .path,
            "spec.http[0].rewrite"
        );
    }

    #[test]
    fn a_cors_policy_needs_valid_origins_methods_headers_and_max_age() {
        let good = istio::CorsPolicy {
            allow_origins: vec![istio::StringMatch {
                regex: Some(r"https://.*\.example".into()),
                ..Default::default()
            }],
            allow_methods: vec!["GET".into(), "PATCH".into()],
            allow_headers: vec!["x-token".into()],
            expose_headers: vec!["x-trace".into()],
            max_age: Some("24h".into()),
            ..Default::default()
        };
        let with = |c: istio::CorsPolicy| {
            to_reviews(istio::HttpRoute {
                cors_policy: Some(c),
                ..Default::default()
            })
        };
        let check = |c: istio::CorsPolicy| virtual_service(&with(c), &mut Vec::new());
        assert!(check(good.clone()).is_ok());
        for (bad, path) in [
            (
                istio::CorsPolicy {
                    allow_origins: vec![istio::StringMatch {
                        regex: Some("([".into()),
                        ..Default::default()
                    }],
                    ..good.clone()
                },
                "allowOrigins[0].regex",
            ),
            (
                istio::CorsPolicy {
                    allow_origins: vec![istio::StringMatch::default()],
                    ..good.clone()
                },
                "allowOrigins[0]",
            ),
            (
                istio::CorsPolicy {
                    allow_methods: vec!["GET".into(), "NOT A METHOD".into()],
                    ..good.clone()
                },
                "allowMethods[1]",
            ),
            (
                istio::CorsPolicy {
                    allow_headers: vec!["x token".into()],
                    ..good.clone()
                },
                "allowHeaders[0]",
            ),
            (
                istio::CorsPolicy {
                    expose_headers: vec!["".into()],
                    ..good.clone()
                },
                "exposeHeaders[0]",
            ),
            (
                istio::CorsPolicy {
                    max_age: Some("a day".into()),
                    ..good.clone()
                },
                "maxAge",
            ),
            (
                istio::CorsPolicy {
                    max_age: Some("1500ms".into()),
                    ..good.clone()
                },
                "maxAge",
            ),
        ] {
            assert_eq!(
                check(bad).expect_err(path).path,
                format!("spec.http[0].corsPolicy.{path}")
            );
        }
    }

    #[test]
    fn an_http_route_cors_filter_needs_origins_methods_and_a_positive_max_age() {
        let spec = |c: gateway::HttpCorsFilter| gateway::HTTPRouteSpec {
            parent_refs: vec![Default::default()],
            rules: vec![gateway::HttpRouteRule {
                filters: vec![gateway::HttpRouteFilter {
                    type_: "CORS".into(),
                    cors: Some(c),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        };
        let good = gateway::HttpCorsFilter {
            allow_origins: vec![
                "*".into(),
                "https://*.example.com".into(),
                "http://localhost:8080".into(),
            ],
            allow_methods: vec!["GET".into(), "*".into()],
            allow_headers: vec!["content-type".into()],
            max_age: Some(600),
            ..Default::default()
        };
        assert!(http_route(&spec(good.clone())).is_ok());
        let origins = |o: &str| gateway::HttpCorsFilter {
            allow_origins: vec![o.into()],
            ..good.clone()
        };
        for bad in [
            origins("example.com"),
            origins("ftp://example.com"),
            origins("https://"),
            origins("https://example.com:0"),
            origins("https://example.com/path"),
        ] {
            assert_eq!(
                http_route(&spec(bad)).expect_err("origin").path,
                "spec.rules[0].filters[0].cors.allowOrigins[0]"
            );
        }
        let e = http_route(&spec(gateway::HttpCorsFilter {
            max_age: Some(0),
            ..good.clone()
        }))
        .expect_err("max age");
        assert_eq!(e.path, "spec.rules[0].filters[0].cors.maxAge");
        let e = http_route(&spec(gateway::HttpCorsFilter {
            allow_methods: vec!["NOT A METHOD".into()],
            ..good
        }))
        .expect_err("method");
        assert_eq!(e.path, "spec.rules[0].filters[0].cors.allowMethods[0]");
    }

    #[test]
    fn grpc_route_method_matches_are_checked() {
        let spec = |type_: Option<&str>, service: Option<&str>, method: Option<&str>| {
            gateway::GRPCRouteSpec {
                parent_refs: vec![gateway::ParentReference {
                    kind: Some("Service".into()),
                    name: "reviews".into(),
                    ..Default::default()
                }],
                rules: vec![gateway::GrpcRouteRule {
                    matches: vec![gateway::GrpcRouteMatch {
                        method: Some(gateway::GrpcMethodMatch {
                            type_: type_.map(Into::into),
                            service: service.map(Into::into),
                            method: method.map(Into::into),
                        }),
                        headers: vec![],
                    }],
                    ..Default::default()
                }],
                ..Default::default()
            }
        };
        assert!(grpc_route(&spec(None, Some("reviews.v1.Reviews"), None)).is_ok());
        let e = grpc_route(&spec(None, None, None)).expect_err("empty exact");
        assert_eq!(e.path, "spec.rules[0].matches[0].method");
        let e = grpc_route(&spec(Some("Prefix"), Some("a"), None)).expect_err("type");
        assert!(
            e.message.contains("Exact or RegularExpression"),
            "{}",
            e.message
        );
        let e = grpc_route(&spec(Some("RegularExpression"), Some("(bad"), None)).expect_err("re");
        assert_eq!(e.path, "spec.rules[0].matches[0].method");
        let no_parent = gateway::GRPCRouteSpec::default();
        assert_eq!(
            grpc_route(&no_parent).expect_err("parent").path,
            "spec.parentRefs"
        );
    }
}
