//! A configuration file, as `messenger serve --config` reads it: merged over
//! the defaults and validated. Nothing may panic, and whatever is accepted
//! renders back to TOML that is accepted again, unchanged.

#![no_main]

use libfuzzer_sys::fuzz_target;
use messenger_platform::config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(parsed) = config::parse::<messenger::Config>(text) else { return };
    let rendered = config::render(&parsed).expect("an accepted configuration renders");
    let again = config::parse::<messenger::Config>(&rendered).expect("a rendered configuration is accepted");
    assert_eq!(config::render(&again).unwrap(), rendered, "rendering is not stable");
});
