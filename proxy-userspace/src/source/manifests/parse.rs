//! Files → typed Kubernetes objects. Multi-document YAML, JSON and `kind: List` are accepted;
//! every problem becomes a [`Diagnostic`] naming the file (and object, when it has one) while the
//! remaining documents of the folder are still used.

use std::fmt;
use std::path::{Path, PathBuf};

use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::{Endpoints, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::ServiceCIDR;
use serde::Deserialize;
use serde_json::Value;

use crate::cluster::Diagnostic;

/// Where an object was read from: the file and, for multi-document files, which document.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    pub file: PathBuf,
    /// 1-based document number in a multi-document YAML file.
    pub document: usize,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.document > 1 {
            write!(f, "{} (document {})", self.file.display(), self.document)
        } else {
            write!(f, "{}", self.file.display())
        }
    }
}

/// The kinds the manifests source understands.
#[derive(Clone, Debug)]
pub enum Object {
    Service(Service),
    Endpoints(Endpoints),
    EndpointSlice(EndpointSlice),
    Node(Node),
    Pod(Pod),
    Deployment(Deployment),
    ReplicaSet(ReplicaSet),
    ServiceCidr(ServiceCIDR),
}

#[derive(Clone, Debug)]
pub struct Parsed {
    pub origin: Origin,
    pub object: Object,
}

/// Builds a diagnostic for an object read from `origin`.
pub fn diagnostic(
    object: impl Into<String>,
    origin: &Origin,
    reason: impl fmt::Display,
) -> Diagnostic {
    Diagnostic {
        object: object.into(),
        message: format!("{origin}: {reason}"),
    }
}

/// `Kind namespace/name` (or `Kind name` when the document has no namespace).
fn describe(value: &Value) -> String {
    let kind = value
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or("object");
    let metadata = value.get("metadata");
    let name = metadata
        .and_then(|m| m.get("name"))
        .and_then(Value::as_str)
        .unwrap_or("<unnamed>");
    match metadata
        .and_then(|m| m.get("namespace"))
        .and_then(Value::as_str)
    {
        Some(namespace) => format!("{kind} {namespace}/{name}"),
        None => format!("{kind} {name}"),
    }
}

/// Reads one file; `.json` files are JSON, everything else multi-document YAML.
pub fn parse_file(path: &Path, text: &str, diagnostics: &mut Vec<Diagnostic>) -> Vec<Parsed> {
    let mut parsed = Vec::new();
    let file_object = format!("file {}", path.display());
    let is_json = path.extension().is_some_and(|e| e == "json");
    if is_json {
        let origin = Origin {
            file: path.to_owned(),
            document: 1,
        };
        match serde_json::from_str::<Value>(text) {
            Ok(value) => parse_value(value, &origin, &mut parsed, diagnostics),
            Err(error) => diagnostics.push(diagnostic(
                file_object,
                &origin,
                format!("invalid JSON: {error}"),
            )),
        }
        return parsed;
    }
    for (index, document) in serde_norway::Deserializer::from_str(text).enumerate() {
        let origin = Origin {
            file: path.to_owned(),
            document: index + 1,
        };
        match Value::deserialize(document) {
            Ok(value) => parse_value(value, &origin, &mut parsed, diagnostics),
            Err(error) => {
                // A YAML syntax error leaves the parser without a way to find the next document.
                diagnostics.push(diagnostic(
                    file_object,
                    &origin,
                    format!("invalid YAML: {error}"),
                ));
                break;
            }
        }
    }
    parsed
}

fn parse_value(
    value: Value,
    origin: &Origin,
    parsed: &mut Vec<Parsed>,
    diagnostics: &mut Vec<Diagnostic>,
) {
    if value.is_null() {
        // An empty document (`---` at the end of a file, or a comment-only file).
        return;
    }
    let object_name = describe(&value);
    let api_version = value
        .get("apiVersion")
        .and_then(Value::as_str)
        .unwrap_or("");
    let kind = value.get("kind").and_then(Value::as_str).unwrap_or("");
    if kind.ends_with("List") && value.get("items").is_some_and(Value::is_array) {
        if let Value::Object(mut list) = value
            && let Some(Value::Array(items)) = list.remove("items")
        {
            for item in items {
                parse_value(item, origin, parsed, diagnostics);
            }
        }
        return;
    }
    let object = match (api_version, kind) {
        ("v1", "Service") => typed(&value, origin, &object_name, diagnostics).map(Object::Service),
        ("v1", "Endpoints") => {
            typed(&value, origin, &object_name, diagnostics).map(Object::Endpoints)
        }
        ("v1", "Node") => typed(&value, origin, &object_name, diagnostics).map(Object::Node),
        ("v1", "Pod") => typed(&value, origin, &object_name, diagnostics).map(Object::Pod),
        ("discovery.k8s.io/v1", "EndpointSlice") => {
            typed(&value, origin, &object_name, diagnostics).map(Object::EndpointSlice)
        }
        ("apps/v1", "Deployment") => {
            typed(&value, origin, &object_name, diagnostics).map(Object::Deployment)
        }
        ("apps/v1", "ReplicaSet") => {
            typed(&value, origin, &object_name, diagnostics).map(Object::ReplicaSet)
        }
        ("networking.k8s.io/v1", "ServiceCIDR") => {
            typed(&value, origin, &object_name, diagnostics).map(Object::ServiceCidr)
        }
        ("", _) | (_, "") => {
            diagnostics.push(diagnostic(
                object_name,
                origin,
                "not a Kubernetes object: apiVersion and kind are required",
            ));
            None
        }
        _ => {
            diagnostics.push(diagnostic(
                object_name,
                origin,
                format!(
                    "unknown kind {kind} ({api_version}): the proxy reads Services, Endpoints, \
                     EndpointSlices, Nodes, Pods, Deployments, ReplicaSets and ServiceCIDRs"
                ),
            ));
            None
        }
    };
    if let Some(object) = object {
        parsed.push(Parsed {
            origin: origin.clone(),
            object,
        });
    }
}

/// Strictly typed parse: a type error or a field the Kubernetes schema does not have is a
/// diagnostic and the object is skipped (kubectl's default `--validate=strict` rejects both).
fn typed<T>(
    value: &Value,
    origin: &Origin,
    object_name: &str,
    diagnostics: &mut Vec<Diagnostic>,
) -> Option<T>
where
    T: serde::de::DeserializeOwned + serde::Serialize,
{
    // k8s-openapi ignores unknown fields when deserializing; serializing the typed object back
    // and comparing keys finds them.
    let parsed = T::deserialize(value).and_then(|object| {
        let round_trip = serde_json::to_value(&object)?;
        Ok((object, round_trip))
    });
    let (object, round_trip) = match parsed {
        Ok(parsed) => parsed,
        Err(error) => {
            diagnostics.push(diagnostic(
                object_name,
                origin,
                format!("invalid object: {error}"),
            ));
            return None;
        }
    };
    let mut unknown = Vec::new();
    unknown_fields(value, &round_trip, "", &mut unknown);
    if unknown.is_empty() {
        Some(object)
    } else {
        diagnostics.push(diagnostic(
            object_name,
            origin,
            format!("unknown field(s) {}", unknown.join(", ")),
        ));
        None
    }
}

/// Paths of keys in `original` that the typed round trip dropped (null values count as absent).
fn unknown_fields(original: &Value, round_trip: &Value, path: &str, unknown: &mut Vec<String>) {
    match (original, round_trip) {
        (Value::Object(original), Value::Object(round_trip)) => {
            for (key, value) in original {
                let child = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                match round_trip.get(key) {
                    Some(typed) => unknown_fields(value, typed, &child, unknown),
                    None if value.is_null() => {}
                    None => unknown.push(format!("\"{child}\"")),
                }
            }
        }
        (Value::Array(original), Value::Array(round_trip)) => {
            for (index, (value, typed)) in original.iter().zip(round_trip).enumerate() {
                unknown_fields(value, typed, &format!("{path}[{index}]"), unknown);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(name: &str, text: &str) -> (Vec<Parsed>, Vec<Diagnostic>) {
        let mut diagnostics = Vec::new();
        let parsed = parse_file(Path::new(name), text, &mut diagnostics);
        (parsed, diagnostics)
    }

    #[test]
    fn documents_lists_and_errors() {
        struct Case {
            name: &'static str,
            file: &'static str,
            text: &'static str,
            objects: usize,
            diagnostic: Option<&'static str>,
        }
        let cases = [
            Case {
                name: "two documents and an empty one",
                file: "a.yaml",
                text: "apiVersion: v1\nkind: Service\nmetadata: {name: a}\n---\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: p}\n",
                objects: 2,
                diagnostic: None,
            },
            Case {
                name: "kind List",
                file: "l.yaml",
                text: "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Service\n  metadata: {name: a}\n- apiVersion: v1\n  kind: Node\n  metadata: {name: n}\n",
                objects: 2,
                diagnostic: None,
            },
            Case {
                name: "JSON file",
                file: "s.json",
                text: r#"{"apiVersion":"v1","kind":"Service","metadata":{"name":"a"}}"#,
                objects: 1,
                diagnostic: None,
            },
            Case {
                name: "YAML syntax error names the file",
                file: "bad.yaml",
                text: "apiVersion: v1\nkind: Service\nmetadata: {name: [\n",
                objects: 0,
                diagnostic: Some("file bad.yaml|bad.yaml: invalid YAML"),
            },
            Case {
                name: "unknown kind names the object",
                file: "cm.yaml",
                text: "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c, namespace: x}\n",
                objects: 0,
                diagnostic: Some("ConfigMap x/c|cm.yaml: unknown kind ConfigMap"),
            },
            Case {
                name: "unknown field is rejected with its path",
                file: "u.yaml",
                text: "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec:\n  sessionAfinity: ClientIP\n",
                objects: 0,
                diagnostic: Some("Service a|u.yaml: unknown field(s) \"spec.sessionAfinity\""),
            },
            Case {
                name: "unknown field inside a list element",
                file: "u2.yaml",
                text: "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec:\n  ports:\n  - port: 80\n    prot: 1\n",
                objects: 0,
                diagnostic: Some("Service a|u2.yaml: unknown field(s) \"spec.ports[0].prot\""),
            },
            Case {
                name: "type error",
                file: "t.yaml",
                text: "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec:\n  ports:\n  - port: eighty\n",
                objects: 0,
                diagnostic: Some("Service a|t.yaml: invalid object"),
            },
            Case {
                name: "second document still read after a bad first",
                file: "m.yaml",
                text: "apiVersion: v1\nkind: Secret\nmetadata: {name: s}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: a}\n",
                objects: 1,
                diagnostic: Some("Secret s|m.yaml: unknown kind"),
            },
        ];
        for case in cases {
            let (parsed, diagnostics) = parse(case.file, case.text);
            assert_eq!(parsed.len(), case.objects, "{}: {diagnostics:?}", case.name);
            match case.diagnostic {
                None => assert!(diagnostics.is_empty(), "{}: {diagnostics:?}", case.name),
                Some(expected) => {
                    let (object, message) = expected.split_once('|').unwrap();
                    assert_eq!(diagnostics.len(), 1, "{}: {diagnostics:?}", case.name);
                    assert_eq!(diagnostics[0].object, object, "{}", case.name);
                    assert!(
                        diagnostics[0].message.starts_with(message),
                        "{}: {:?}",
                        case.name,
                        diagnostics[0].message
                    );
                }
            }
        }
    }
}
