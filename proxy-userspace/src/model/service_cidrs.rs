//! Where unallocated addresses are dropped, as kube-proxy decides it: the CIDRs of every
//! ServiceCIDR object (its ServiceCIDR config keeps the union of their `spec.cidrs`, whatever
//! their status), and `--service-cluster-ip-range` only when it was given explicitly. With
//! neither, nothing is dropped: an address outside every Service is the network's business.

use std::collections::BTreeMap;

use ipnet::IpNet;
use k8s_openapi::api::networking::v1::ServiceCIDR;

use crate::cluster::Diagnostic;
use crate::cluster::ObjectKey;

/// The drop ranges, sorted and without duplicates. A `spec.cidrs` entry that is not a CIDR is
/// reported and skipped; the object's other CIDRs still count.
pub fn drop_ranges(
    objects: &BTreeMap<ObjectKey, ServiceCIDR>,
    explicit: &[IpNet],
    diagnostics: &mut Vec<Diagnostic>,
) -> Vec<IpNet> {
    let mut ranges: Vec<IpNet> = explicit.to_vec();
    for (key, object) in objects {
        let cidrs = object.spec.as_ref().and_then(|spec| spec.cidrs.as_ref());
        for (index, text) in cidrs.into_iter().flatten().enumerate() {
            match text.parse::<IpNet>() {
                Ok(cidr) => ranges.push(cidr.trunc()),
                Err(_) => diagnostics.push(Diagnostic {
                    object: format!("ServiceCIDR {}", key.name),
                    message: format!("spec.cidrs[{index}] {text:?} is not a CIDR; ignored"),
                }),
            }
        }
    }
    ranges.sort_unstable();
    ranges.dedup();
    ranges
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn objects(specs: &[(&str, &[&str])]) -> BTreeMap<ObjectKey, ServiceCIDR> {
        specs
            .iter()
            .map(|(name, cidrs)| {
                let key = ObjectKey {
                    namespace: String::new(),
                    name: (*name).to_owned(),
                };
                let object: ServiceCIDR = serde_json::from_value(json!({
                    "metadata": {"name": name},
                    "spec": {"cidrs": cidrs},
                }))
                .unwrap();
                (key, object)
            })
            .collect()
    }

    #[test]
    fn union_of_objects_and_the_explicit_flag() {
        struct Case {
            name: &'static str,
            objects: &'static [(&'static str, &'static [&'static str])],
            explicit: &'static [&'static str],
            ranges: &'static [&'static str],
            diagnostics: &'static [&'static str],
        }
        let cases = [
            Case {
                name: "no objects, no flag: nothing is dropped",
                objects: &[],
                explicit: &[],
                ranges: &[],
                diagnostics: &[],
            },
            Case {
                name: "k3s: the ServiceCIDR alone, 10.96.0.0/12 is not a service range",
                objects: &[("kubernetes", &["10.43.0.0/16"])],
                explicit: &[],
                ranges: &["10.43.0.0/16"],
                diagnostics: &[],
            },
            Case {
                name: "an explicit flag adds to the objects",
                objects: &[("kubernetes", &["10.43.0.0/16", "fd43::/108"])],
                explicit: &["10.96.0.0/12"],
                ranges: &["10.43.0.0/16", "10.96.0.0/12", "fd43::/108"],
                diagnostics: &[],
            },
            Case {
                name: "an extra ServiceCIDR widens the range; duplicates count once",
                objects: &[
                    ("extra", &["10.44.0.0/24", "10.43.0.0/16"]),
                    ("kubernetes", &["10.43.0.0/16"]),
                ],
                explicit: &["10.43.0.0/16"],
                ranges: &["10.43.0.0/16", "10.44.0.0/24"],
                diagnostics: &[],
            },
            Case {
                name: "a bad entry is reported, the object's other CIDR kept",
                objects: &[("broken", &["10.50.0.0/33", "10.51.0.0/16"])],
                explicit: &[],
                ranges: &["10.51.0.0/16"],
                diagnostics: &[
                    "ServiceCIDR broken: spec.cidrs[0] \"10.50.0.0/33\" is not a CIDR; ignored",
                ],
            },
            Case {
                name: "host bits are cleared",
                objects: &[("sloppy", &["10.60.1.2/16"])],
                explicit: &[],
                ranges: &["10.60.0.0/16"],
                diagnostics: &[],
            },
        ];
        for case in cases {
            let explicit: Vec<IpNet> = case.explicit.iter().map(|c| c.parse().unwrap()).collect();
            let mut diagnostics = Vec::new();
            let ranges = drop_ranges(&objects(case.objects), &explicit, &mut diagnostics);
            let ranges: Vec<String> = ranges.iter().map(ToString::to_string).collect();
            assert_eq!(ranges, case.ranges, "{}", case.name);
            let diagnostics: Vec<String> = diagnostics
                .iter()
                .map(|d| format!("{}: {}", d.object, d.message))
                .collect();
            assert_eq!(diagnostics, case.diagnostics, "{}", case.name);
        }
    }

    #[test]
    fn cluster_ips_outside_the_ranges_turn_the_vip_lookup_on() {
        let cases: [(&[&str], &[&str], bool); 5] = [
            (&[], &[], false),
            (&["10.43.0.0/16"], &["10.43.0.10"], false),
            (&["10.43.0.0/16"], &["10.43.0.10", "10.96.0.10"], true),
            (&[], &["10.96.0.10"], true),
            (
                &["10.43.0.0/16", "fd43::/108"],
                &["10.43.0.10", "fd43::a"],
                false,
            ),
        ];
        for (cidrs, ips, outside) in cases {
            let rules = crate::model::AddressRules {
                service_cidrs: cidrs.iter().map(|c| c.parse().unwrap()).collect(),
                cluster_ips: ips.iter().map(|ip| ip.parse().unwrap()).collect(),
            };
            assert_eq!(
                rules.cluster_ips_outside_service_cidrs(),
                outside,
                "{cidrs:?} {ips:?}"
            );
        }
    }
}
