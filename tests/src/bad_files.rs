//! 1,000 bad manifest files to drop beside working Services in a running proxy's folder: copies
//! claiming what a working Service holds, bit flips, truncations, invalid ports, addresses and
//! names. A proxy that validates and allocates like the API server keeps serving every working
//! Service exactly as before (issue 15; `tests/services.rs` and `cargo xtask demo --bad-files`).

/// What a working Service holds that an impostor claims.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Claim {
    ClusterIp,
    NodePort,
    ExternalIp,
    LoadBalancerIp,
}

/// One value a working Service holds, with the Service port it is served on (an externalIP or
/// LoadBalancer IP conflicts per address and port).
#[derive(Clone, Debug)]
pub struct Held {
    pub claim: Claim,
    pub value: String,
    pub port: u16,
}

/// The working Services the bad files are made from and aimed at.
pub struct Target<'a> {
    /// Their YAML: bit-flipped and truncated copies are made from it.
    pub originals: &'a [String],
    /// What they hold, for the impostors to claim.
    pub held: &'a [Held],
    /// A working Service's name (namespace `default`) that some impostors reuse in other files.
    pub taken_name: &'a str,
    /// The `app` label the impostors select: pods that are not the working Services'.
    pub impostor_app: &'a str,
    /// The `app` label the other bad Services select.
    pub app: &'a str,
    /// The impostors' targetPort.
    pub target_port: u16,
}

/// How many files [`generate`] makes.
pub const COUNT: usize = 1000;

/// A small deterministic generator (xorshift): the same files on every run.
struct Noise(u64);

impl Noise {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn service(name: &str, spec: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n{spec}"
    )
}

/// [`COUNT`] bad files `(file name, content)`, named `bad-NNNN.yaml`: a quarter impostors
/// (copies under new file names claiming a held value, some under the taken name, all selecting
/// the impostors' pods), a quarter bit flips, the rest truncations and invalid ports, addresses
/// and names.
pub fn generate(target: &Target) -> Vec<(String, String)> {
    let mut noise = Noise(0x9e37_79b9_7f4a_7c15);
    let app = target.app;
    let mut files = Vec::with_capacity(COUNT);
    for i in 0..COUNT {
        let original = &target.originals[noise.below(target.originals.len())];
        let content = match i % 8 {
            0 | 1 => impostor(target, &target.held[noise.below(target.held.len())], i),
            2 | 3 => {
                let mut bytes = original.clone().into_bytes();
                for _ in 0..=noise.below(3) {
                    let at = noise.below(bytes.len());
                    bytes[at] ^= 1 << noise.below(7);
                }
                String::from_utf8_lossy(&bytes).into_owned()
            }
            4 => original[..noise.below(original.len())].to_owned(),
            5 => service(
                &format!("bad-port-{i}"),
                &format!(
                    "  selector:\n    app: {app}\n  ports:\n  - port: {}\n",
                    [0, 70000, -1][noise.below(3)]
                ),
            ),
            6 => service(
                &format!("bad-ip-{i}"),
                &format!(
                    "  clusterIP: 10.96.0.{}\n  selector:\n    app: {app}\n  ports:\n  - port: 80\n",
                    256 + i
                ),
            ),
            _ => service(
                ["UPPER", "bad_name", "-dash"][noise.below(3)],
                &format!("  selector:\n    app: {app}\n  ports:\n  - port: 80\n"),
            ),
        };
        files.push((format!("bad-{i:04}.yaml"), content));
    }
    files
}

/// A Service claiming `held`, selecting the impostors' pods: under the taken name every 16th
/// file, else under a name that sorts before the working Services'.
fn impostor(target: &Target, held: &Held, i: usize) -> String {
    let name = if i.is_multiple_of(16) {
        target.taken_name.to_owned()
    } else {
        format!("a-imp-{i}")
    };
    let Held { claim, value, port } = held;
    let ports = format!(
        "  selector:\n    app: {}\n  ports:\n  - port: {port}\n    targetPort: {}\n",
        target.impostor_app, target.target_port
    );
    match claim {
        Claim::ClusterIp => service(&name, &format!("  clusterIP: {value}\n{ports}")),
        Claim::NodePort => service(
            &name,
            &format!("  type: NodePort\n{ports}    nodePort: {value}\n"),
        ),
        Claim::ExternalIp => service(&name, &format!("  externalIPs:\n  - {value}\n{ports}")),
        Claim::LoadBalancerIp => format!(
            "{}status:\n  loadBalancer:\n    ingress:\n    - ip: {value}\n",
            service(&name, &format!("  type: LoadBalancer\n{ports}"))
        ),
    }
}
