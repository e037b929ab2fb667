"""Logins compared as people read them: RFC 8265's UsernameCaseMapped profile (PRECIS).

``café`` typed composed or decomposed, ``admin`` in fullwidth letters (U+FF41...) and
``Admin`` are one login (width mapped, case mapped, NFC); a login that holds
a space, a control character, an invisible format character (a zero-width
space, a bidi override) or a character Unicode does not assign is refused, so
two logins never look the same and differ. New identities are stored in the
enforced form, and every identity's ``login_key`` is it (store.fill_login_keys
fills it for logins stored before, as typed): its unique index refuses a
look-alike of any login, and a login is found by its exact text or its key.
precis-i18n implements the profile (its own tables, from the Unicode data).
"""

from __future__ import annotations

import precis_i18n

from attune_sse.errors import AttuneError

_PROFILE = precis_i18n.get_profile("UsernameCaseMapped")

_REASONS = {
    "empty": "is empty",
    "spaces": "holds a space",
    "controls": "holds a control character",
    "precis_ignorable_properties": "holds an invisible character (a zero-width space, a direction mark or "
                                   "override, a format character)",
    "unassigned": "holds a character that Unicode does not assign",
    "has_compat": "holds a compatibility character (write it as the plain character it stands for)",
    "bidi_rule": "mixes right-to-left and left-to-right characters in a way that can be misread",
    # Characters allowed only in some contexts (RFC 5892's rules), used where they are not:
    "zero_width_joiner": "holds an invisible character (a zero-width joiner) where its script does not join",
    "zero_width_nonjoiner": "holds an invisible character (a zero-width non-joiner) where its script does not "
                            "join",
}


class InvalidLogin(AttuneError):
    """A login the profile refuses; ``reason`` says why, as a phrase ("holds a space")."""

    def __init__(self, login: str, reason: str) -> None:
        super().__init__(f"login {login[:40]!r} {reason}")
        self.login = login
        self.reason = reason


def enforce(login: str) -> str:
    """The login as it is stored and compared; InvalidLogin if the profile refuses it."""
    try:
        return _PROFILE.enforce(login)
    except UnicodeError as exc:
        code = str(getattr(exc, "reason", "")).partition("/")[2]
        raise InvalidLogin(login, _REASONS.get(code, f"holds a character a login may not hold ({code})")) from None


def key_of(login: str) -> str | None:
    """What two logins that look the same have in common: the enforced form (None if the profile refuses
    the login: an identity made before logins were enforced, or by another service, may have one)."""
    try:
        return enforce(login)
    except InvalidLogin:
        return None


def counted_as(login: str) -> str:
    """Whose failed logins a given login counts toward: every look-alike of one login counts as one."""
    return key_of(login) or login
