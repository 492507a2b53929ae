// Scratch tool (not committed): loads each tc program and prints the verifier's figures.
use aya::{EbpfLoader, programs::SchedClassifier};
fn main() {
    let bpffs = proxy_lab::PrivateBpffs::mount("vstats").unwrap();
    let object = match std::env::args().nth(1) {
        Some(path) => std::fs::read(path).unwrap(),
        None => proxy_userspace::EBPF_OBJECT.to_vec(),
    };
    let mut ebpf = EbpfLoader::new()
        .default_map_pin_directory(bpffs.path())
        .load(&object)
        .unwrap();
    for name in ["epx_ingress", "epx_trace"] {
        let program: &mut SchedClassifier = ebpf.program_mut(name).unwrap().try_into().unwrap();
        let start = std::time::Instant::now();
        match program.load() {
            Ok(()) => {
                let info = program.info().unwrap();
                println!(
                    "{name}: verified {:?} insns, size {} insns, {:?}",
                    info.verified_instruction_count(),
                    info.size_translated().unwrap_or(0) / 8,
                    start.elapsed()
                );
            }
            Err(aya::programs::ProgramError::LoadError {
                io_error,
                verifier_log,
            }) => {
                let log = verifier_log.to_string();
                let lines: Vec<_> = log.lines().collect();
                std::fs::write(format!("/tmp/frag-verifier-{name}.log"), &log).unwrap();
                println!("{name}: FAILED {io_error} {:?}", start.elapsed());
                for line in &lines[lines.len().saturating_sub(8)..] {
                    println!("  {}", &line[..line.len().min(200)]);
                }
            }
            Err(e) => println!("{name}: {e}"),
        }
    }
}
