"""Kubernetes' rules for names, labels and label selectors, as pure functions.

The checks return None when the value is fine, or Kubernetes' own explanation
(k8s.io/apimachinery/pkg/util/validation) when it is not, so messages read like
the API server's. Selector matching is here too because the loader needs it to
check that a controller's selector matches its pod template; controllers can
use the same function.
"""

from __future__ import annotations

import re

_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_DNS1123_LABEL = re.compile(rf"^{_LABEL}$")
_DNS1123_SUBDOMAIN = re.compile(rf"^{_LABEL}(\.{_LABEL})*$")
_DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_QUALIFIED_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_IANA_SVC_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")


def dns1123_label(value: str) -> str | None:
    if len(value) > 63:
        return "must be no more than 63 characters"
    if not _DNS1123_LABEL.match(value):
        return ("a lowercase RFC 1123 label must consist of lower case alphanumeric "
                "characters or '-', and must start and end with an alphanumeric character "
                "(e.g. 'my-name', or '123-abc')")
    return None


def dns1123_subdomain(value: str) -> str | None:
    if len(value) > 253:
        return "must be no more than 253 characters"
    if not _DNS1123_SUBDOMAIN.match(value):
        return ("a lowercase RFC 1123 subdomain must consist of lower case alphanumeric "
                "characters, '-' or '.', and must start and end with an alphanumeric "
                "character (e.g. 'example.com')")
    return None


def dns1035_label(value: str) -> str | None:
    if len(value) > 63:
        return "must be no more than 63 characters"
    if not _DNS1035_LABEL.match(value):
        return ("a DNS-1035 label must consist of lower case alphanumeric characters or "
                "'-', start with an alphabetic character, and end with an alphanumeric "
                "character (e.g. 'my-name', or 'abc-123')")
    return None


def env_var_name(value: str) -> str | None:
    """IsRelaxedEnvVarName, Kubernetes' rule since RelaxedEnvironmentVariableValidation
    (GA in 1.34): any printable ASCII character but '='. A '=' would split the
    name in the process's environment (NAME=VALUE) and put another variable there."""
    if value and all(" " <= ch <= "~" and ch != "=" for ch in value):
        return None
    return "a valid environment variable name must consist only of printable ASCII characters other than '='"


_PERCENT = re.compile(r"^[0-9]+%$")


def percent(value: str) -> str | None:
    """IsValidPercent, for int-or-string fields such as maxSurge."""
    if _PERCENT.match(value):
        return None
    return ("a valid percent string must be a numeric string followed by an ending '%' "
            "(e.g. '1%',  or '93%', regex used for validation is '[0-9]+%')")


HOSTNAME_MAX = 63


def pod_hostname(pod_name: str) -> str:
    """The hostname a pod's sandbox gets: its name, cut to 63 characters (a DNS
    label) with trailing '-' and '.' removed, as the kubelet does
    (truncatePodHostnameIfNeeded). A pod name may be a 253-character subdomain,
    which Linux refuses as a hostname (64 bytes at most)."""
    if len(pod_name) <= HOSTNAME_MAX:
        return pod_name
    return pod_name[:HOSTNAME_MAX].rstrip("-.")


def port_name(value: str) -> str | None:
    """IANA_SVC_NAME: the rule for container and service port names."""
    if len(value) > 15:
        return "must be no more than 15 characters"
    if not _IANA_SVC_NAME.match(value):
        return "must contain only alpha-numeric characters (a-z, 0-9), and hyphens (-)"
    if "--" in value:
        return "must not contain consecutive hyphens"
    if not re.search(r"[a-z]", value):
        return "must contain at least one letter (a-z)"
    return None


def label_key(key: str) -> str | None:
    prefix, slash, name = key.rpartition("/")
    if slash and (not prefix or dns1123_subdomain(prefix)):
        return "prefix part must be a lowercase RFC 1123 subdomain (e.g. 'example.com/MyName')"
    if len(name) > 63:
        return "name part must be no more than 63 characters"
    if not _QUALIFIED_NAME.match(name):
        return ("name part must consist of alphanumeric characters, '-', '_' or '.', and "
                "must start and end with an alphanumeric character (e.g. 'MyName', "
                "or 'my.name', or '123-abc')")
    return None


def label_value(value: str) -> str | None:
    if len(value) > 63:
        return "must be no more than 63 characters"
    if not _LABEL_VALUE.match(value):
        return ("a valid label must be an empty string or consist of alphanumeric "
                "characters, '-', '_' or '.', and must start and end with an alphanumeric "
                "character (e.g. 'MyValue', or 'my_value', or '12345')")
    return None


def go_repr(value) -> str:
    """A value as Go's %#v prints it, for messages copied from Kubernetes."""
    if isinstance(value, dict):
        inner = ", ".join(f'"{k}":"{v}"' for k, v in sorted(value.items()))
        return f"map[string]string{{{inner}}}"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
