#[allow(warnings)]
mod sys;
