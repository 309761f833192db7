//! Which service a process belongs to: what it says in its own environment (`DD_SERVICE`,
//! then `OTEL_SERVICE_NAME`), else the first configured rule that matches it, else the name
//! of its executable (marked inferred, as Datadog's `service_inferred:yes`). Whatever the
//! process chose is a tag value ([`super::tag_value`]) by the time it is a service.

use regex::Regex;
use router_config::{ServiceRule, ServicesConfig};

use super::{tag_value, ProcessInfo, ProcessValue};

/// A process's service, environment and version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    /// The service's name.
    pub name: String,
    /// Whether the name is only the executable's.
    pub inferred: bool,
    /// `DD_ENV` of the process.
    pub env: Option<String>,
    /// `DD_VERSION` of the process.
    pub version: Option<String>,
}

/// A configured rule, compiled.
struct Rule {
    service: String,
    comm: Option<Regex>,
    exe: Option<Regex>,
    container_id: Option<String>,
}

impl Rule {
    /// The rule, or `None` if a pattern does not compile (the configuration's validation
    /// refuses those before the router starts).
    fn compile(rule: &ServiceRule) -> Option<Rule> {
        let whole = |pattern: &Option<String>| -> Option<Option<Regex>> {
            match pattern {
                Some(p) => Regex::new(&format!("^(?:{p})$")).ok().map(Some),
                None => Some(None),
            }
        };
        Some(Rule {
            service: rule.service.clone(),
            comm: whole(&rule.comm)?,
            exe: whole(&rule.exe)?,
            container_id: rule.container_id.clone(),
        })
    }

    fn matches(&self, process: &ProcessInfo) -> bool {
        self.comm.as_ref().is_none_or(|r| r.is_match(&process.comm))
            && self
                .exe
                .as_ref()
                .is_none_or(|r| process.exe.as_deref().is_some_and(|e| r.is_match(e)))
            && self.container_id.as_ref().is_none_or(|id| {
                process
                    .container_id
                    .as_deref()
                    .is_some_and(|c| c.starts_with(id.as_str()))
            })
    }
}

/// Finds each process's service as configured (`[producer.services]`).
pub struct ServiceResolver {
    infer: bool,
    rules: Vec<Rule>,
}

impl ServiceResolver {
    /// The resolver for `config`.
    pub fn new(config: &ServicesConfig) -> Self {
        Self {
            infer: config.infer,
            rules: config.rules.iter().filter_map(Rule::compile).collect(),
        }
    }

    /// The service of `process`; `None` when inference is off or nothing names one.
    ///
    /// ```
    /// use router::process::{ProcessInfo, ServiceResolver};
    /// use router_config::{ServiceRule, ServicesConfig};
    /// let config = ServicesConfig {
    ///     infer: true,
    ///     rules: vec![ServiceRule { service: "batch".into(), comm: Some("job-.*".into()), exe: None, container_id: None }],
    /// };
    /// let resolver = ServiceResolver::new(&config);
    /// let mut p = ProcessInfo { comm: "job-7".into(), exe: Some("/usr/bin/python3".into()), ..Default::default() };
    /// assert_eq!(resolver.resolve(&p).unwrap().name, "batch");
    /// p.comm = "other".into();
    /// let s = resolver.resolve(&p).unwrap();
    /// assert_eq!((s.name.as_str(), s.inferred), ("python3", true));
    /// p.environment.dd_service = Some("web".into());
    /// let s = resolver.resolve(&p).unwrap();
    /// assert_eq!((s.name.as_str(), s.inferred), ("web", false));
    /// ```
    pub fn resolve(&self, process: &ProcessInfo) -> Option<Service> {
        if !self.infer {
            return None;
        }
        let env = &process.environment;
        let (name, inferred) = if let Some(name) = env.dd_service.as_ref() {
            (name.clone(), false)
        } else if let Some(name) = env.otel_service_name.as_ref() {
            (name.clone(), false)
        } else if let Some(rule) = self.rules.iter().find(|r| r.matches(process)) {
            (rule.service.clone(), false)
        } else {
            let exe = process
                .exe
                .as_deref()
                .map(|e| e.trim_end_matches(" (deleted)"));
            let name = exe
                .and_then(|e| e.rsplit('/').next())
                .filter(|n| !n.is_empty())
                .unwrap_or(&process.comm);
            if name.is_empty() {
                return None;
            }
            // Any user names its executable (`a,env:prod`): a tag value like the others,
            // counted each interval it names the service.
            (tag_value(ProcessValue::Service, name), true)
        };
        Some(Service {
            name,
            inferred,
            env: env.dd_env.clone(),
            version: env.dd_version.clone(),
        })
    }
}
