//! Target resource names: never a panic, and a URL built from one never leaves its service's host.
#![no_main]

use authprobe::{engine::target::parse_target, google::endpoints::Endpoints};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|resource: &str| {
    if let Ok(kind) = parse_target(resource) {
        let endpoints = Endpoints::new(&[]);
        let service = kind.service();
        if let Ok(url) = endpoints.url(service, &kind.test_permissions_path()) {
            assert_eq!(url.host_str(), Some(format!("{service}.googleapis.com").as_str()), "{resource} -> {url}");
        }
    }
});
