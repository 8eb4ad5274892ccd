"""The privacy notice (rekisteriseloste), generated from the live schema and config.

Section 5 (contents of the register) is built from the columns the database
really has, through the ``info["notice"]`` annotation each model column
carries: a column the models do not classify is listed as unclassified and
makes ``icap-gateway register notice`` exit non-zero, so a schema change
cannot slip past the published notice.  Sections 1-3 come from the
``[register]`` controller keys and the retention periods from config; the
rest follows the controller's published notice (shared/seed) word for word.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from sqlalchemy import Engine, inspect

from register.models import Base
from register.settings import RegisterSettings

Lang = Literal["fi", "en"]

# The notice's own order and wording of section 5 (privacy-notice-fi.txt).
CATEGORIES: dict[str, dict[str, str]] = {
    "company-name": {"fi": "Yrityksen nimi", "en": "Company name"},
    "company-address": {"fi": "Yrityksen osoite", "en": "Company address"},
    "billing": {"fi": "Maksamisen ja laskutuksen tiedot", "en": "Payment and billing data"},
    "orders": {"fi": "Tiedot tilauksista", "en": "Order data"},
    "username": {"fi": "Käyttäjätunnus", "en": "Username"},
    "ip-address": {"fi": "Tietokoneen IP-osoite", "en": "The computer's IP address"},
    "login-time": {"fi": "Mahdollinen kirjautumisaika", "en": "Possible login time"},
    "auth-failure": {
        "fi": "Mahdollinen tieto epäonnistuneesta tunnistautumisesta",
        "en": "Possible record of a failed authentication",
    },
}
NOT_PERSONAL = {"internal", "controller"}


@dataclass
class SchemaCategories:
    present: dict[str, list[str]] = field(default_factory=dict)  # category -> ["table.column"]
    unclassified: list[str] = field(default_factory=list)


def classify(engine: Engine) -> SchemaCategories:
    """Map the live database's columns to notice categories."""
    out = SchemaCategories()
    insp = inspect(engine)
    tables = set(insp.get_table_names())
    for table in Base.metadata.sorted_tables:
        if table.name not in tables:
            continue
        for col in insp.get_columns(table.name):
            model_col = table.columns.get(col["name"])
            category = model_col.info.get("notice") if model_col is not None else None
            where = f"{table.name}.{col['name']}"
            if category in CATEGORIES:
                out.present.setdefault(category, []).append(where)
            elif category not in NOT_PERSONAL:
                out.unclassified.append(where)
    for table_name in sorted(tables - {t.name for t in Base.metadata.sorted_tables} - {"alembic_version"}):
        out.unclassified.append(f"{table_name}.*")
    out.present = {c: out.present[c] for c in CATEGORIES if c in out.present}
    return out


def _days(seconds: float) -> int:
    return round(seconds / 86400)


def missing_settings(settings: RegisterSettings) -> list[str]:
    return [f"[register] {key}" for key in ("controller", "controller_address", "contact_name",
                                            "contact_email")
            if not getattr(settings, key)]


def render(settings: RegisterSettings, schema: SchemaCategories, lang: Lang = "fi") -> str:
    ctl = settings.controller or "[register] controller"
    addr = settings.controller_address or "[register] controller_address"
    contact = settings.contact_name or "[register] contact_name"
    email = settings.contact_email or "[register] contact_email"
    items = [CATEGORIES[c][lang] for c in CATEGORIES if c in schema.present]
    if lang == "fi":
        name = settings.register_name or f"{ctl}:n anti-virus -palvelu"
        contents = "\n".join(f"- {i}" for i in items)
        if schema.unclassified:
            contents += "\n\nLuokittelemattomat tiedot (tarkista seloste): " + ", ".join(schema.unclassified)
        return f"""REKISTERISELOSTE - {name}

1. Rekisterinpitäjä

{ctl}, {addr}

2. Yhteyshenkilö rekisteriä koskevissa asioissa

{contact}, {email}

3. Rekisterin nimi

{name}

4. Henkilötietojen käsittelyn tarkoitus

Rekisterin käyttötarkoitus on {ctl}:n tarjoaman anti-virus -palvelun toteuttaminen. Tietoja voidaan käyttää {ctl}:n toiminnan kehittämiseen, tilastollisiin tarkoituksiin ja henkilökohtaisemman kohdennetun sisällön tuottamiseen ja viestintään palveluissamme.

{ctl} saattaa käyttää asiakas- ja palvelusuhteen ylläpitämiseen yhteistyökumppaneita. Osa rekisteritiedoista saatetaan siirtää yhteistyökumppanin palvelimille teknisten vaatimusten vuoksi. Tietoja käsitellään ainoastaan {ctl}:n palveluiden tuottamiseen teknisten rajapintojen kautta.

5. Rekisterin tietosisältö

Rekisterin pääasialliset tiedot

{contents}

6. Säännönmukaiset tietolähteet

Pääasiallisena tietolähteenä toimii asiakas itse.

7. Tietojen säännönmukaiset luovutukset

Rekisterin tiedot ovat ainoastaan {ctl}:n käytössä, paitsi {ctl}:n käyttäessä ulkoista palveluntarjoajaa lisäarvopalvelun tuottamiseen. Tietoja ei kuitenkaan luovuteta {ctl}:n ulkopuolelle tai sen yhteistyökumppaneiden omaan käyttöön, paitsi lainsäädännön sitä velvoittaessa.

Rekisteröityneen henkilötiedot hävitetään käyttäjän pyynnöstä ellei lainsäädäntö, sopimuksellinen asia tai palveluntuottaminen käyttäjälle estä tietojen poistamista.

Säilytysajat: kirjautumistiedot {_days(settings.login_retention)} päivää viimeisestä käytöstä; tiedot epäonnistuneista tunnistautumisista {_days(settings.failure_retention)} päivää; laskutus- ja tilaustiedot kirjanpitolain mukaan {_days(settings.billing_retention)} päivää viimeisestä tilauksesta; rekisterin käyttöloki {_days(settings.audit_retention)} päivää.

8. Tietojen siirto EU:n tai ETA:n ulkopuolelle

Rekisterin tietoja ei luovuteta EU:n tai Euroopan talousalueen ulkopuolelle.

9. Rekisterin suojauksen periaatteet

Sähköisessä muodossa olevat henkilötiedot on suojattu toimialalla yleisesti hyväksyttävien ja kohtuullisin teknisin keinoin kuten palomurein ja salasanoin.

Ainoastaan yksilöidyillä rekisterinpitäjän tai sen toimeksiannosta ja lukuun toimivien yritysten työntekijöillä on pääsy rekisterissä käsiteltäviin henkilötietoihin {ctl}:n myöntämien käyttöoikeuksien mukaisesti. Jokainen henkilötietojen luku, luovutus ja poisto kirjataan käyttäjän nimellä. {ctl} huomioi siihen sovellettavan lainsäädännön ja viranomaisten määräykset ja toimialajärjestöjen ohjeet henkilötietojen luottamuksellisen käsittelyn varmistamisesta.
"""  # noqa: E501
    name = settings.register_name or f"The anti-virus service of {ctl}"
    contents = "\n".join(f"- {i}" for i in items)
    if schema.unclassified:
        contents += "\n\nUnclassified data (review this notice): " + ", ".join(schema.unclassified)
    return f"""PRIVACY NOTICE (REGISTER DESCRIPTION) - {name}

1. Controller

{ctl}, {addr}

2. Contact for register matters

{contact}, {email}

3. Name of the register

{name}

4. Purpose of processing

The register is used to provide the anti-virus service of {ctl}. The data may also be used to develop {ctl}'s business, for statistics, and for more personal, targeted content and communication in its services.

{ctl} may use partners to maintain customer and service relationships. Some register data may be moved to partners' servers for technical reasons. The data is processed only to produce {ctl}'s services, through technical interfaces.

5. Contents of the register

Main data of the register:

{contents}

6. Regular sources of data

The customer itself is the main source of data.

7. Regular disclosures

The data is used only by {ctl}, except when {ctl} uses an external provider to produce a value-added service. The data is not disclosed outside {ctl} or to its partners' own use, except where law requires.

A registered person's data is destroyed at their request unless legislation, a contractual matter, or providing the service to the user prevents the deletion.

Retention: login records {_days(settings.login_retention)} days after the last activity; records of failed authentication {_days(settings.failure_retention)} days; billing and order data {_days(settings.billing_retention)} days after the last order, as accounting law requires; the register's access log {_days(settings.audit_retention)} days.

8. Transfers outside the EU or EEA

Register data is not transferred outside the EU or the European Economic Area.

9. Principles of protecting the register

Personal data in electronic form is protected by technical means generally accepted and reasonable in the industry, such as firewalls and passwords.

Only named employees of the controller, or of companies acting on its behalf, have access to the personal data in the register, according to the access rights {ctl} grants. Every read, export and erasure of personal data is logged with the employee's name. {ctl} follows the applicable law, the authorities' orders and industry guidance on confidential processing of personal data.
"""  # noqa: E501
