//! The committed `crds/` output is what the code generates, and the schemas are ones the API
//! server accepts as structural.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers may panic

use resultity_operator::crd::{all_crds, crds_yaml};
use serde_json::Value;

#[test]
fn committed_crds_match_generated() {
    let committed = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../crds/resultity.yaml"
    ))
    .unwrap();
    assert!(
        committed == crds_yaml().unwrap(),
        "crds/resultity.yaml is stale: run `cargo run -p resultity-operator -- crd > crds/resultity.yaml`"
    );
}

/// Every schema node must say its type (or opt out explicitly), and no references or
/// unions with typed branches may remain: the rules for a structural schema.
fn check_structural(path: &str, s: &Value, problems: &mut Vec<String>) {
    let Some(obj) = s.as_object() else {
        problems.push(format!("{path}: schema is not an object"));
        return;
    };
    for forbidden in ["$ref", "definitions", "$defs", "$schema"] {
        if obj.contains_key(forbidden) {
            problems.push(format!("{path}: contains {forbidden}"));
        }
    }
    let typed = obj.contains_key("type")
        || obj.contains_key("x-kubernetes-int-or-string")
        || obj.contains_key("x-kubernetes-preserve-unknown-fields");
    if !typed {
        problems.push(format!("{path}: no type"));
    }
    if obj.get("type").is_some_and(|t| !t.is_string()) {
        problems.push(format!("{path}: type must be a single string"));
    }
    // The one union a structural schema may type: int-or-string's integer|string.
    let int_or_string_union = obj.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true))
        && obj.get("anyOf") == Some(&serde_json::json!([{"type": "integer"}, {"type": "string"}]));
    for union in ["anyOf", "oneOf", "allOf"] {
        if union == "anyOf" && int_or_string_union {
            continue;
        }
        if let Some(branches) = obj.get(union).and_then(Value::as_array) {
            for (i, b) in branches.iter().enumerate() {
                for key in ["type", "description", "default", "nullable"] {
                    if b.get(key).is_some() {
                        problems.push(format!("{path}.{union}[{i}]: sets {key}"));
                    }
                }
            }
        }
    }
    if let Some(props) = obj.get("properties").and_then(Value::as_object) {
        for (k, v) in props {
            check_structural(&format!("{path}.{k}"), v, problems);
        }
    }
    if let Some(items) = obj.get("items") {
        check_structural(&format!("{path}[]"), items, problems);
    }
    if let Some(ap) = obj.get("additionalProperties").filter(|v| v.is_object()) {
        check_structural(&format!("{path}{{}}"), ap, problems);
    }
}

fn schema_of(crd_name: &str) -> Value {
    let crd = all_crds()
        .into_iter()
        .find(|c| c.metadata.name.as_deref() == Some(crd_name))
        .unwrap();
    let v = serde_json::to_value(&crd).unwrap();
    v["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone()
}

#[test]
fn schemas_are_structural() {
    for name in [
        "resultitynetworks.resultity.com",
        "resultitynodes.resultity.com",
        "resultityfleets.resultity.com",
    ] {
        let mut problems = Vec::new();
        check_structural(name, &schema_of(name), &mut problems);
        assert!(problems.is_empty(), "{name}: {problems:#?}");
    }
}

#[test]
fn conditions_are_a_list_map_keyed_by_type() {
    for name in [
        "resultitynetworks.resultity.com",
        "resultitynodes.resultity.com",
    ] {
        let conds = &schema_of(name)["properties"]["status"]["properties"]["conditions"];
        assert_eq!(conds["x-kubernetes-list-type"], "map", "{name}");
        assert_eq!(
            conds["x-kubernetes-list-map-keys"],
            serde_json::json!(["type"]),
            "{name}"
        );
        let required = conds["items"]["required"].as_array().unwrap();
        assert!(
            required.contains(&"type".into()),
            "{name}: list-map key must be required"
        );
    }
}

#[test]
fn short_names_status_subresource_and_cel_rules() {
    let crds = all_crds();
    let short: Vec<_> = crds
        .iter()
        .map(|c| c.spec.names.short_names.clone().unwrap_or_default())
        .collect();
    assert_eq!(
        short,
        vec![
            vec!["rnet".to_owned()],
            vec!["rnode".to_owned()],
            vec!["rfleet".to_owned()]
        ]
    );
    for c in &crds {
        let v = &c.spec.versions[0];
        assert!(v.subresources.as_ref().unwrap().status.is_some());
        assert!(!v.additional_printer_columns.as_ref().unwrap().is_empty());
    }
    let yaml = crds_yaml().unwrap();
    assert!(yaml.contains("x-kubernetes-validations"));
    assert_eq!(crds[0].spec.scope, "Cluster");
    assert_eq!(crds[1].spec.scope, "Namespaced");
    assert_eq!(crds[2].spec.scope, "Namespaced");
    // `kubectl scale rfleet` works through the scale subresource.
    let scale = crds[2].spec.versions[0]
        .subresources
        .as_ref()
        .unwrap()
        .scale
        .as_ref()
        .unwrap();
    assert_eq!(scale.spec_replicas_path, ".spec.replicas");
}

/// Collection a rule walks (`self.all(…)`, `self.limits.all(…)`, …) at `node`, by the field
/// path after `self`; `None` for `self` itself.
fn walked_collections(rule: &str) -> Vec<Option<String>> {
    let mut out = Vec::new();
    for macro_ in [".all(", ".exists(", ".exists_one(", ".map(", ".filter("] {
        let mut rest = rule;
        while let Some(i) = rest.find(macro_) {
            let before = &rest[..i];
            let start = before
                .rfind(|c: char| !(c.is_ascii_alphanumeric() || c == '.' || c == '_'))
                .map_or(0, |p| p + 1);
            let receiver = &before[start..];
            if receiver == "self" {
                out.push(None);
            } else if let Some(field) = receiver.strip_prefix("self.") {
                out.push(Some(field.to_owned()));
            }
            rest = &rest[i + macro_.len()..];
        }
    }
    out
}

fn check_bounded(path: &str, s: &Value, problems: &mut Vec<String>) {
    let bounded =
        |node: &Value| node.get("maxItems").is_some() || node.get("maxProperties").is_some();
    for rule in s
        .get("x-kubernetes-validations")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|v| v["rule"].as_str())
    {
        for walked in walked_collections(rule) {
            let (what, node) = match &walked {
                None => (path.to_owned(), s),
                Some(field) => (
                    format!("{path}.{field}"),
                    field.split('.').fold(s, |n, f| &n["properties"][f]),
                ),
            };
            if !bounded(node) {
                problems.push(format!(
                    "{what}: walked by `{rule}` without maxItems/maxProperties"
                ));
            }
        }
    }
    if let Some(props) = s.get("properties").and_then(Value::as_object) {
        for (k, v) in props {
            check_bounded(&format!("{path}.{k}"), v, problems);
        }
    }
    if let Some(items) = s.get("items") {
        check_bounded(&format!("{path}[]"), items, problems);
    }
    if let Some(ap) = s.get("additionalProperties").filter(|v| v.is_object()) {
        check_bounded(&format!("{path}{{}}"), ap, problems);
    }
}

/// The API server estimates a rule's cost from the sizes the schema allows and refuses the
/// CRD when the estimate is over budget; an unbounded list or map a rule iterates is sized as
/// big as a request, so every collection a rule walks must carry its bound.
#[test]
fn every_collection_a_rule_walks_is_bounded() {
    assert_eq!(
        walked_collections(
            "(!has(self.limits) || self.limits.all(k, true)) && self.all(m, self.exists_one(n, n == m))"
        ),
        vec![Some("limits".to_owned()), None, None]
    );
    let mut problems = Vec::new();
    for name in [
        "resultitynetworks.resultity.com",
        "resultitynodes.resultity.com",
        "resultityfleets.resultity.com",
    ] {
        check_bounded(name, &schema_of(name), &mut problems);
    }
    assert!(problems.is_empty(), "{problems:#?}");
}

/// A model of the API server's static cost estimate for our CEL rules, so a rule the server
/// would refuse fails here first (the client-side `Validator` evaluates rules but never
/// estimates them).
///
/// What it reproduces (k8s.io/apiextensions-apiserver and cel-go's checker, as of
/// Kubernetes 1.32):
/// - a rule's cost is cel-go's estimate of its expression, multiplied by the product of the
///   `maxItems`/`maxProperties` of every list and map above the rule's node, and must stay
///   under `StaticEstimatedCostLimit`; the sum over a CRD under `StaticEstimatedCRDCostLimit`;
/// - sizes come from the schema: a string is `maxLength` × 4 bytes, an enum its longest value,
///   otherwise (and an int-or-string always) the 3 MiB request size less its quotes; a map key
///   is a string the server sizes as 0; a list or map without a bound holds as many of its
///   smallest elements as a request fits (taken here as one byte each, which is larger);
/// - costs: 1 per identifier, field selection, `has()` and O(1) call; string comparisons
///   0.1 per byte of the shorter side; `matches` (0.1 per byte + 0.1) × (0.25 per regex char);
///   `contains` 0.1 × 0.1 per byte of both; `startsWith` 0.1 per byte of the prefix; `split`
///   0.2 per byte; `isQuantity`/`quantity` 0.1 per byte of the argument; `in` one per list
///   item; list literals 10; `all`/`exists`/`exists_one` the range plus, per element, the
///   body plus the macro's own loop (3, 4 and 2).
///
/// Anything it does not know (a function, a macro, an identifier) fails the test rather than
/// guess, so a new rule shape has to be modelled before it ships.
mod cost {
    use serde_json::Value;

    pub const STATIC_ESTIMATED_COST_LIMIT: u64 = 10_000_000;
    pub const STATIC_ESTIMATED_CRD_COST_LIMIT: u64 = 100_000_000;
    /// `DefaultMaxRequestSizeBytes`.
    const MAX_REQUEST_SIZE_BYTES: u64 = 3 * 1024 * 1024;
    /// A string without a bound: the request less its two quotes.
    pub const UNBOUNDED_STRING: u64 = MAX_REQUEST_SIZE_BYTES - 2;
    /// A list or map without a bound: one-byte elements filling a request (an over-estimate).
    const UNBOUNDED_COLLECTION: u64 = (MAX_REQUEST_SIZE_BYTES - 2) / 2;

    #[derive(Debug, Clone, PartialEq)]
    enum Tok {
        Ident(String),
        Str(String),
        Int(i64),
        Op(&'static str),
    }

    const OPS: [&str; 22] = [
        "&&", "||", "==", "!=", "<=", ">=", "<", ">", "!", "?", ":", "(", ")", "[", "]", ",", ".",
        "+", "-", "*", "/", "%",
    ];

    fn tokens(src: &str) -> Result<Vec<Tok>, String> {
        let chars: Vec<char> = src.chars().collect();
        let mut out = Vec::new();
        let mut i = 0;
        while i < chars.len() {
            let c = chars[i];
            if c.is_whitespace() {
                i += 1;
            } else if c.is_ascii_digit() {
                let start = i;
                while i < chars.len() && chars[i].is_ascii_digit() {
                    i += 1;
                }
                let text: String = chars[start..i].iter().collect();
                out.push(Tok::Int(text.parse().map_err(|e| format!("{text}: {e}"))?));
            } else if c == '\''
                || c == '"'
                || (c == 'r' && matches!(chars.get(i + 1), Some('\'' | '"')))
            {
                let raw = c == 'r';
                if raw {
                    i += 1;
                }
                let quote = chars[i];
                i += 1;
                let mut s = String::new();
                loop {
                    let Some(&ch) = chars.get(i) else {
                        return Err(format!("unterminated string in `{src}`"));
                    };
                    i += 1;
                    if ch == quote {
                        break;
                    }
                    if ch == '\\' && !raw {
                        let Some(&esc) = chars.get(i) else {
                            return Err(format!("dangling escape in `{src}`"));
                        };
                        i += 1;
                        s.push(match esc {
                            'n' => '\n',
                            't' => '\t',
                            other => other,
                        });
                    } else {
                        s.push(ch);
                    }
                }
                out.push(Tok::Str(s));
            } else if c.is_ascii_alphabetic() || c == '_' {
                let start = i;
                while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_') {
                    i += 1;
                }
                out.push(Tok::Ident(chars[start..i].iter().collect()));
            } else {
                let rest: String = chars[i..chars.len().min(i + 2)].iter().collect();
                let op = OPS
                    .iter()
                    .find(|op| rest.starts_with(**op))
                    .ok_or_else(|| format!("unexpected `{c}` in `{src}`"))?;
                out.push(Tok::Op(op));
                i += op.chars().count();
            }
        }
        Ok(out)
    }

    #[derive(Debug, Clone)]
    enum Expr {
        Str(String),
        Int,
        Bool,
        Null,
        Ident(String),
        List(Vec<Expr>),
        Select(Box<Expr>, String),
        Has(Box<Expr>),
        /// Functions and operators alike: member target, name, arguments.
        Call(Option<Box<Expr>>, String, Vec<Expr>),
        Index(Box<Expr>, Box<Expr>),
        Cond(Box<Expr>, Box<Expr>, Box<Expr>),
        Macro {
            kind: String,
            range: Box<Expr>,
            var: String,
            body: Box<Expr>,
        },
    }

    struct Parser {
        toks: Vec<Tok>,
        at: usize,
    }

    impl Parser {
        fn peek(&self) -> Option<&Tok> {
            self.toks.get(self.at)
        }
        fn eat(&mut self, op: &str) -> bool {
            if matches!(self.peek(), Some(Tok::Op(o)) if *o == op) {
                self.at += 1;
                true
            } else {
                false
            }
        }
        fn expect(&mut self, op: &str) -> Result<(), String> {
            if self.eat(op) {
                Ok(())
            } else {
                Err(format!("expected `{op}` at token {}", self.at))
            }
        }
        fn binary(name: &str, l: Expr, r: Expr) -> Expr {
            Expr::Call(None, name.to_owned(), vec![l, r])
        }
        fn expr(&mut self) -> Result<Expr, String> {
            let c = self.or()?;
            if self.eat("?") {
                let t = self.expr()?;
                self.expect(":")?;
                let f = self.expr()?;
                return Ok(Expr::Cond(Box::new(c), Box::new(t), Box::new(f)));
            }
            Ok(c)
        }
        fn or(&mut self) -> Result<Expr, String> {
            let mut l = self.and()?;
            while self.eat("||") {
                l = Self::binary("_||_", l, self.and()?);
            }
            Ok(l)
        }
        fn and(&mut self) -> Result<Expr, String> {
            let mut l = self.rel()?;
            while self.eat("&&") {
                l = Self::binary("_&&_", l, self.rel()?);
            }
            Ok(l)
        }
        fn rel(&mut self) -> Result<Expr, String> {
            let mut l = self.add()?;
            loop {
                let name = match self.peek() {
                    Some(Tok::Op(op @ ("==" | "!=" | "<" | "<=" | ">" | ">="))) => {
                        format!("_{op}_")
                    }
                    Some(Tok::Ident(kw)) if kw == "in" => "@in".to_owned(),
                    _ => return Ok(l),
                };
                self.at += 1;
                l = Self::binary(&name, l, self.add()?);
            }
        }
        fn add(&mut self) -> Result<Expr, String> {
            let mut l = self.mul()?;
            loop {
                let name = match self.peek() {
                    Some(Tok::Op(op @ ("+" | "-"))) => format!("_{op}_"),
                    _ => return Ok(l),
                };
                self.at += 1;
                l = Self::binary(&name, l, self.mul()?);
            }
        }
        fn mul(&mut self) -> Result<Expr, String> {
            let mut l = self.unary()?;
            loop {
                let name = match self.peek() {
                    Some(Tok::Op(op @ ("*" | "/" | "%"))) => format!("_{op}_"),
                    _ => return Ok(l),
                };
                self.at += 1;
                l = Self::binary(&name, l, self.unary()?);
            }
        }
        fn unary(&mut self) -> Result<Expr, String> {
            if self.eat("!") {
                return Ok(Expr::Call(None, "!_".into(), vec![self.unary()?]));
            }
            if self.eat("-") {
                return Ok(Expr::Call(None, "-_".into(), vec![self.unary()?]));
            }
            self.member()
        }
        fn args(&mut self, close: &str) -> Result<Vec<Expr>, String> {
            let mut args = Vec::new();
            if self.eat(close) {
                return Ok(args);
            }
            loop {
                args.push(self.expr()?);
                if self.eat(close) {
                    return Ok(args);
                }
                self.expect(",")?;
            }
        }
        fn member(&mut self) -> Result<Expr, String> {
            let mut e = self.primary()?;
            loop {
                if self.eat(".") {
                    let Some(Tok::Ident(name)) = self.peek().cloned() else {
                        return Err(format!("expected a name after `.` at token {}", self.at));
                    };
                    self.at += 1;
                    if self.eat("(") {
                        let mut args = self.args(")")?;
                        if ["all", "exists", "exists_one", "map", "filter"].contains(&name.as_str())
                        {
                            let body = args.pop();
                            let var = args.pop();
                            let (Some(body), Some(Expr::Ident(var)), true) =
                                (body, var, args.is_empty())
                            else {
                                return Err(format!("macro {name} takes a variable and a body"));
                            };
                            e = Expr::Macro {
                                kind: name,
                                range: Box::new(e),
                                var,
                                body: Box::new(body),
                            };
                        } else {
                            e = Expr::Call(Some(Box::new(e)), name, args);
                        }
                    } else {
                        e = Expr::Select(Box::new(e), name);
                    }
                } else if self.eat("[") {
                    let i = self.expr()?;
                    self.expect("]")?;
                    e = Expr::Index(Box::new(e), Box::new(i));
                } else {
                    return Ok(e);
                }
            }
        }
        fn primary(&mut self) -> Result<Expr, String> {
            let tok = self.peek().cloned();
            self.at += 1;
            match tok {
                Some(Tok::Str(s)) => Ok(Expr::Str(s)),
                Some(Tok::Int(_)) => Ok(Expr::Int),
                Some(Tok::Ident(id)) if id == "true" || id == "false" => Ok(Expr::Bool),
                Some(Tok::Ident(id)) if id == "null" => Ok(Expr::Null),
                Some(Tok::Ident(id)) => {
                    if self.eat("(") {
                        let mut args = self.args(")")?;
                        if id == "has" {
                            return match (args.pop(), args.is_empty()) {
                                (Some(sel @ Expr::Select(..)), true) => {
                                    Ok(Expr::Has(Box::new(sel)))
                                }
                                _ => Err("has() takes one field selection".into()),
                            };
                        }
                        Ok(Expr::Call(None, id, args))
                    } else {
                        Ok(Expr::Ident(id))
                    }
                }
                Some(Tok::Op("(")) => {
                    let e = self.expr()?;
                    self.expect(")")?;
                    Ok(e)
                }
                Some(Tok::Op("[")) => Ok(Expr::List(self.args("]")?)),
                other => Err(format!("unexpected {other:?} at token {}", self.at - 1)),
            }
        }
    }

    fn parse(rule: &str) -> Result<Expr, String> {
        let mut p = Parser {
            toks: tokens(rule)?,
            at: 0,
        };
        let e = p.expr()?;
        if p.at != p.toks.len() {
            return Err(format!("trailing input at token {} of `{rule}`", p.at));
        }
        Ok(e)
    }

    /// What an expression is, as far as its size goes.
    #[derive(Debug, Clone)]
    enum Ty<'a> {
        Schema(&'a Value, String),
        Str(u64),
        /// A map's key: a string the server sizes as 0 (its key type has no size).
        MapKey,
        Scalar,
        List(Box<Ty<'a>>, u64),
        Unknown,
    }

    fn int_or_string(s: &Value) -> bool {
        s.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true))
    }

    fn is_map(s: &Value) -> bool {
        s.get("type").and_then(Value::as_str) == Some("object")
            && s.get("additionalProperties").is_some_and(Value::is_object)
    }

    /// The size the server assumes, and whether it is the bound-less fallback.
    fn size_of(ty: &Ty) -> (u64, bool) {
        match ty {
            Ty::Str(n) | Ty::List(_, n) => (*n, false),
            Ty::MapKey => (0, false),
            Ty::Scalar => (1, false),
            Ty::Unknown => (u64::MAX, true),
            Ty::Schema(s, _) if int_or_string(s) => (UNBOUNDED_STRING, true),
            Ty::Schema(s, _) => {
                let num = |k: &str| s.get(k).and_then(Value::as_u64);
                match s.get("type").and_then(Value::as_str) {
                    Some("string") => {
                        match (num("maxLength"), s.get("enum").and_then(Value::as_array)) {
                            (Some(n), _) => (n.saturating_mul(4), false),
                            (None, Some(values)) => (
                                values
                                    .iter()
                                    .filter_map(Value::as_str)
                                    .map(|v| v.chars().count() as u64)
                                    .max()
                                    .unwrap_or(0),
                                false,
                            ),
                            (None, None) => (UNBOUNDED_STRING, true),
                        }
                    }
                    Some("array") => {
                        num("maxItems").map_or((UNBOUNDED_COLLECTION, true), |n| (n, false))
                    }
                    Some("object") if is_map(s) => {
                        num("maxProperties").map_or((UNBOUNDED_COLLECTION, true), |n| (n, false))
                    }
                    Some("integer" | "number" | "boolean") => (1, false),
                    _ => (0, false),
                }
            }
        }
    }

    fn factor(n: u64, num: u128, den: u128) -> u64 {
        // ceil(n × num / den), saturating like cel-go's arithmetic.
        let v = (u128::from(n) * num).div_ceil(den);
        u64::try_from(v).unwrap_or(u64::MAX)
    }

    struct Estimator<'a> {
        vars: Vec<(String, Ty<'a>)>,
        root: &'a Value,
        /// Schema paths whose size a rule's cost depends on but that declare no bound. An
        /// int-or-string is not listed: the server sizes it as a whole request whatever bound
        /// it declares, so only its cost (still counted) can be kept small.
        unbounded: Vec<String>,
    }

    impl<'a> Estimator<'a> {
        fn sized(&mut self, ty: &Ty) -> u64 {
            let (n, fallback) = size_of(ty);
            let declarable = !matches!(ty, Ty::Schema(s, _) if int_or_string(s));
            if fallback && declarable {
                self.unbounded.push(match ty {
                    Ty::Schema(_, path) => path.clone(),
                    _ => "a value of unknown size".into(),
                });
            }
            n
        }

        fn elem(&self, ty: &Ty<'a>, iterating: bool) -> Ty<'a> {
            match ty {
                Ty::Schema(s, path) if s.get("type").and_then(Value::as_str) == Some("array") => {
                    Ty::Schema(&s["items"], format!("{path}[]"))
                }
                Ty::Schema(s, _) if is_map(s) && iterating => Ty::MapKey,
                Ty::Schema(s, path) if is_map(s) => {
                    Ty::Schema(&s["additionalProperties"], format!("{path}{{}}"))
                }
                Ty::List(e, _) => (**e).clone(),
                _ => Ty::Unknown,
            }
        }

        fn cost(&mut self, e: &Expr) -> Result<(u64, Ty<'a>), String> {
            Ok(match e {
                Expr::Str(s) => (0, Ty::Str(s.chars().count() as u64)),
                Expr::Int | Expr::Bool | Expr::Null => (0, Ty::Scalar),
                Expr::Ident(id) => {
                    if let Some((_, ty)) = self.vars.iter().rev().find(|(v, _)| v == id) {
                        (1, ty.clone())
                    } else if id == "self" {
                        (1, Ty::Schema(self.root, "self".into()))
                    } else {
                        return Err(format!("the cost model does not know identifier `{id}`"));
                    }
                }
                Expr::List(items) => {
                    let mut sum = 10u64;
                    let mut longest = 0;
                    for item in items {
                        let (c, ty) = self.cost(item)?;
                        sum = sum.saturating_add(c);
                        longest = longest.max(size_of(&ty).0);
                    }
                    (
                        sum,
                        Ty::List(Box::new(Ty::Str(longest)), items.len() as u64),
                    )
                }
                Expr::Select(operand, field) => {
                    let (c, ty) = self.cost(operand)?;
                    let field_ty = match &ty {
                        Ty::Schema(s, path) => match s.get("properties").and_then(|p| p.get(field))
                        {
                            Some(prop) => Ty::Schema(prop, format!("{path}.{field}")),
                            // `metadata.name` and the like, which the server adds as plain strings.
                            None => Ty::Str(UNBOUNDED_STRING),
                        },
                        _ => Ty::Unknown,
                    };
                    (c.saturating_add(1), field_ty)
                }
                Expr::Has(sel) => {
                    let Expr::Select(operand, _) = &**sel else {
                        return Err("has() takes a field selection".into());
                    };
                    (self.cost(operand)?.0.saturating_add(1), Ty::Scalar)
                }
                Expr::Index(x, i) => {
                    let (cx, tx) = self.cost(x)?;
                    let (ci, _) = self.cost(i)?;
                    let elem = match &tx {
                        Ty::List(..) | Ty::Schema(..) => self.elem(&tx, false),
                        _ => Ty::Unknown,
                    };
                    (1u64.saturating_add(cx).saturating_add(ci), elem)
                }
                Expr::Cond(c, t, f) => {
                    let (cc, _) = self.cost(c)?;
                    let (ct, tt) = self.cost(t)?;
                    let (cf, tf) = self.cost(f)?;
                    let ty = if size_of(&tt).0 >= size_of(&tf).0 {
                        tt
                    } else {
                        tf
                    };
                    (cc.saturating_add(ct.max(cf)), ty)
                }
                Expr::Macro {
                    kind,
                    range,
                    var,
                    body,
                } => {
                    let (cr, tr) = self.cost(range)?;
                    let n = self.sized(&tr);
                    let elem = self.elem(&tr, true);
                    self.vars.push((var.clone(), elem));
                    let (cb, _) = self.cost(body)?;
                    self.vars.pop();
                    // Result and per-element loop condition and step of the macro's expansion.
                    let (result, per_element) = match kind.as_str() {
                        "all" => (1, 3),
                        "exists" => (1, 4),
                        "exists_one" => (2, 2),
                        other => {
                            return Err(format!("the cost model does not know macro `{other}`"));
                        }
                    };
                    let loop_cost = n.saturating_mul(cb.saturating_add(per_element));
                    (
                        cr.saturating_add(result).saturating_add(loop_cost),
                        Ty::Scalar,
                    )
                }
                Expr::Call(target, name, args) => self.call(target.as_deref(), name, args)?,
            })
        }

        fn call(
            &mut self,
            target: Option<&Expr>,
            name: &str,
            args: &[Expr],
        ) -> Result<(u64, Ty<'a>), String> {
            let mut sum = 0u64;
            let target_ty = match target {
                Some(t) => {
                    let (c, ty) = self.cost(t)?;
                    sum = sum.saturating_add(c);
                    Some(ty)
                }
                None => None,
            };
            let mut arg_tys = Vec::new();
            for a in args {
                let (c, ty) = self.cost(a)?;
                sum = sum.saturating_add(c);
                arg_tys.push(ty);
            }
            let arg = |i: usize| arg_tys.get(i).cloned().unwrap_or(Ty::Unknown);
            let on = target_ty.clone().unwrap_or(Ty::Unknown);
            let (own, ty) = match name {
                "_&&_" | "_||_" => (0, Ty::Scalar),
                "!_" | "-_" | "size" | "_-_" | "_*_" | "_/_" | "_%_" | "int" | "double" => {
                    (1, Ty::Scalar)
                }
                "_==_" | "_!=_" | "_<_" | "_<=_" | "_>_" | "_>=_" => {
                    // The shorter side bounds a comparison; only its size must be known.
                    let (l, r) = (size_of(&arg(0)), size_of(&arg(1)));
                    let shorter = if l.0 <= r.0 { (0, l) } else { (1, r) };
                    let n = if shorter.1.1 {
                        self.sized(&arg(shorter.0))
                    } else {
                        shorter.1.0
                    };
                    (factor(n, 1, 10), Ty::Scalar)
                }
                "@in" => (self.sized(&arg(1)), Ty::Scalar),
                "_+_" => match (&arg(0), &arg(1)) {
                    (Ty::Scalar, _) | (_, Ty::Scalar) => (1, Ty::Scalar),
                    (a, b) => {
                        let n = self.sized(a).saturating_add(self.sized(b));
                        (factor(n, 1, 10), Ty::Str(n))
                    }
                },
                "matches" => {
                    let s = self.sized(&on).saturating_add(1);
                    let re = self.sized(&arg(0));
                    (
                        factor(s, 1, 10).saturating_mul(factor(re, 1, 4)),
                        Ty::Scalar,
                    )
                }
                "contains" => {
                    let s = self.sized(&on);
                    let sub = self.sized(&arg(0));
                    (
                        factor(s, 1, 10).saturating_mul(factor(sub, 1, 10)),
                        Ty::Scalar,
                    )
                }
                "startsWith" | "endsWith" => (factor(self.sized(&arg(0)), 1, 10), Ty::Scalar),
                "split" => {
                    let s = self.sized(&on);
                    (factor(s, 2, 10), Ty::List(Box::new(Ty::Str(s)), s))
                }
                "isQuantity" | "quantity" => {
                    let of = if target.is_some() { on } else { arg(0) };
                    (factor(self.sized(&of), 1, 10), Ty::Unknown)
                }
                "isGreaterThan" | "isLessThan" | "compareTo" | "sign" | "asInteger"
                | "isInteger" | "asApproximateFloat" | "add" | "sub" => (1, Ty::Scalar),
                "string" => {
                    let n = self.sized(&arg(0));
                    (factor(n, 1, 10).max(1), Ty::Str(n))
                }
                other => return Err(format!("the cost model does not know function `{other}`")),
            };
            Ok((sum.saturating_add(own), ty))
        }
    }

    /// The estimated cost of `rule` declared at schema node `node` (before the cardinality),
    /// and the bound-less schema paths its cost depends on.
    pub fn rule_cost(rule: &str, node: &Value, path: &str) -> Result<(u64, Vec<String>), String> {
        let expr = parse(rule)?;
        let mut est = Estimator {
            vars: Vec::new(),
            root: node,
            unbounded: Vec::new(),
        };
        let (cost, _) = est.cost(&expr)?;
        let unbounded = est
            .unbounded
            .into_iter()
            .map(|p| p.replacen("self", path, 1))
            .collect();
        Ok((cost, unbounded))
    }

    /// One rule's estimate, cardinality included.
    #[derive(Debug)]
    pub struct RuleCost {
        pub path: String,
        pub rule: String,
        pub cost: u64,
        pub unbounded: Vec<String>,
    }

    /// Every rule of `schema` with its estimate, walking the schema as the server does.
    pub fn walk(
        path: &str,
        schema: &Value,
        cardinality: u64,
        out: &mut Vec<RuleCost>,
    ) -> Result<(), String> {
        for rule in schema
            .get("x-kubernetes-validations")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|v| v["rule"].as_str())
        {
            let (cost, unbounded) = rule_cost(rule, schema, path)?;
            out.push(RuleCost {
                path: path.to_owned(),
                rule: rule.to_owned(),
                cost: cost.saturating_mul(cardinality),
                unbounded,
            });
        }
        let bound = |key: &str| {
            schema
                .get(key)
                .and_then(Value::as_u64)
                .unwrap_or(UNBOUNDED_COLLECTION)
        };
        if let Some(props) = schema.get("properties").and_then(Value::as_object) {
            for (k, v) in props {
                walk(&format!("{path}.{k}"), v, cardinality, out)?;
            }
        }
        if let Some(items) = schema.get("items") {
            walk(
                &format!("{path}[]"),
                items,
                cardinality.saturating_mul(bound("maxItems")),
                out,
            )?;
        }
        if let Some(ap) = schema.get("additionalProperties").filter(|v| v.is_object()) {
            walk(
                &format!("{path}{{}}"),
                ap,
                cardinality.saturating_mul(bound("maxProperties")),
                out,
            )?;
        }
        Ok(())
    }
}

/// Why the API server would refuse `schema`, or would come within a factor of two of it: any
/// rule over half the per-rule limit, a CRD total over half the CRD limit, or a rule whose
/// cost depends on a string, list or map without a declared bound.
fn budget_problems(name: &str, schema: &Value) -> Vec<String> {
    let mut rules = Vec::new();
    if let Err(e) = cost::walk(name, schema, 1, &mut rules) {
        return vec![e];
    }
    let mut problems = Vec::new();
    let mut total = 0u64;
    for r in &rules {
        total = total.saturating_add(r.cost);
        if r.cost > cost::STATIC_ESTIMATED_COST_LIMIT / 2 {
            problems.push(format!(
                "{}: `{}` estimated at {} ({:.6}x the per-rule limit)",
                r.path,
                r.rule,
                r.cost,
                r.cost as f64 / cost::STATIC_ESTIMATED_COST_LIMIT as f64
            ));
        }
        for u in &r.unbounded {
            problems.push(format!(
                "{}: `{}` depends on the size of {u}, which declares no maxLength/maxItems/maxProperties",
                r.path, r.rule
            ));
        }
    }
    if total > cost::STATIC_ESTIMATED_CRD_COST_LIMIT / 2 {
        problems.push(format!(
            "{name}: rules total {total} ({:.6}x the per-CRD limit)",
            total as f64 / cost::STATIC_ESTIMATED_CRD_COST_LIMIT as f64
        ));
    }
    problems
}

#[test]
fn cel_rules_cost_at_most_half_of_the_api_servers_budget() {
    for name in [
        "resultitynetworks.resultity.com",
        "resultitynodes.resultity.com",
        "resultityfleets.resultity.com",
    ] {
        let problems = budget_problems(name, &schema_of(name));
        assert!(problems.is_empty(), "{problems:#?}");
    }
}

/// The model reproduces the server's refusal of the per-key `isQuantity` rule exactly
/// (Kubernetes 1.32: "estimated rule cost exceeds budget by factor of 1.006657x"), and
/// the budget check refuses it.
#[test]
fn cost_model_refuses_the_per_key_is_quantity_rule() {
    let old_rule = "(!has(self.limits) || self.limits.all(k, isQuantity(self.limits[k]))) && (!has(self.requests) || self.requests.all(k, isQuantity(self.requests[k])))";
    let quantities = serde_json::json!({
        "type": "object",
        "maxProperties": 16,
        "additionalProperties": {"x-kubernetes-int-or-string": true},
    });
    let resources = serde_json::json!({
        "type": "object",
        "properties": {"limits": quantities, "requests": quantities},
        "x-kubernetes-validations": [{"rule": old_rule}],
    });
    let (estimate, _) = cost::rule_cost(old_rule, &resources, "resources").unwrap();
    assert_eq!(
        format!(
            "{:.6}",
            estimate as f64 / cost::STATIC_ESTIMATED_COST_LIMIT as f64
        ),
        "1.006657",
        "{estimate}"
    );
    let problems = budget_problems("resources", &resources);
    assert!(
        problems.iter().any(|p| p.contains("per-rule limit")),
        "{problems:#?}"
    );

    // Bounds matter: the same walk over unbounded maps is refused for its size alone.
    let mut unbounded = resources.clone();
    for key in ["limits", "requests"] {
        unbounded["properties"][key]
            .as_object_mut()
            .unwrap()
            .remove("maxProperties");
    }
    let problems = budget_problems("resources", &unbounded);
    assert!(
        problems.iter().any(|p| p.contains("declares no maxLength")),
        "{problems:#?}"
    );

    // A string rule over a bound-less string is refused though it is cheap per byte.
    let name = serde_json::json!({
        "type": "string",
        "x-kubernetes-validations": [{"rule": "self.matches('^[a-z]+$')"}],
    });
    let problems = budget_problems("name", &name);
    assert!(
        problems.iter().any(|p| p.contains("declares no maxLength")),
        "{problems:#?}"
    );
    let mut bounded = name.clone();
    bounded["maxLength"] = 63.into();
    assert_eq!(budget_problems("name", &bounded), Vec::<String>::new());

    // A rule the model cannot read fails instead of passing unestimated.
    let odd = serde_json::json!({
        "type": "array", "maxItems": 4, "items": {"type": "string", "maxLength": 8},
        "x-kubernetes-validations": [{"rule": "self.map(x, x).size() < 3"}],
    });
    let problems = budget_problems("odd", &odd);
    assert!(
        problems
            .iter()
            .any(|p| p.contains("does not know macro `map`")),
        "{problems:#?}"
    );
}
