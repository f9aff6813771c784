// Element is an unsafe trait: a padded struct cannot claim it in safe code.
#[derive(Clone, Copy)]
#[repr(C)]
struct Padded {
    tag: u8,
    value: u32,
}

impl prism_stream::Element for Padded {}

fn main() {}
