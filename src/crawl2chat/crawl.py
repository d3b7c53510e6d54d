"""The world's pretraining pages as a web crawl: WARC files of HTML pages with site boilerplate, plus
the junk a FineWeb-style data stage must remove, every record labelled in crawl_truth.jsonl.

write_crawl(world, out_dir, seed) renders each world document (never the search-only ones) as an
HTML page with nav, cookie banner, sidebar and footer that vary per site, and adds, in proportion to
the number of documents: adult / malware / spam sites that the URL blocklist catches, marketing spam
on innocent domains, French / German / Spanish and mixed-language pages, low-quality pages (keyword
lists, repetition, fragments, boilerplate only, shouting), near-duplicate mirrors of good pages, good
pages with personal data inserted (kept, to be masked) and a few non-HTML or non-200 records.
The data stage reads only the WARC files; the truth file measures what it kept and removed.
"""
from __future__ import annotations

import html
import ipaddress
import random
import re
import struct
import uuid
import zlib
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime
from io import BytesIO
from pathlib import Path
from urllib.parse import urlsplit

from crawl2chat.common import C2CError, write_jsonl

CATEGORIES = ["good", "pii", "adult", "malware", "spam_url", "spam_quality", "non_english",
              "mixed_language", "low_quality", "near_duplicate", "not_html"]
URL_JUNK = ["adult", "malware", "spam_url"]
JUNK_RATE = 0.03          # each junk category (and pii) gets this share of the good pages, at least 3
RECORDS_PER_FILE = 1000
CRAWL_START = datetime(2024, 3, 1, tzinfo=timezone.utc)

# Blocked by datatrove's URLFilter: registered domains from its shipped blocklist, and URLs with a
# banned word ("xxx", "nsfw", "porno", "viagra", "cialis"), two soft-banned words ("sexy", "lingerie")
# or a banned sub-word ("hot chat", "webcam with" once non-letters are removed).
ADULT_URLS = ["https://takeescorts.com/{slug}", "https://0-livechatlady.com/rooms/{slug}",
              "https://www.club-xxx.example.net/videos/{slug}", "https://nsfw-gallery.example.org/album/{slug}",
              "https://sexy-lingerie.example.shop/{slug}", "https://hot-chat.example.net/{slug}",
              "https://porno-tube.example.com/watch/{slug}", "https://live.example.info/webcam-with-{slug}"]
MALWARE_URLS = ["https://antivirusexpress.com/download/{slug}", "https://anycracks.com/{slug}-activator",
                "https://bestcracks.net/keygen/{slug}", "https://connect-secure-login.com/account/{slug}",
                "https://onlinesecure-login.com/verify/{slug}", "https://0-assist-protect.cf/alert/{slug}"]
SPAM_URLS = ["https://888casino.com/bonus/{slug}", "https://best-online-casino-guide.com/{slug}",
             "https://best-online-pharmacy.net/order/{slug}", "https://allcasinoreviews.com/review/{slug}",
             "https://pharma-deals.example.biz/buy-cheap-viagra-{slug}",
             "https://discount-meds.example.biz/cialis-{slug}"]

ADULT_TEXT = ["Welcome to the hottest adults-only entertainment site on the web.",
              "You must be 18 or older to enter this site.",
              "Thousands of exclusive videos are added every single day.",
              "Join now for free and meet lonely singles in your area tonight.",
              "Our private chat rooms are open around the clock, with no sign-up needed.",
              "Discreet billing and instant access to the members area.",
              "Flirt, chat and find your perfect date in minutes.",
              "The most daring models are waiting for you right now."]
MALWARE_TEXT = ["WARNING: your computer may be infected with 5 dangerous viruses!",
                "Download the free cleaner now to protect your personal files.",
                "Your account has been suspended because of unusual activity.",
                "Verify your password within 24 hours or you will lose access to your account.",
                "Get the full version of any program with our free activator key.",
                "Click the green button below to start the secure download.",
                "Disable your antivirus before running the installer for best results.",
                "Enter your card number to confirm your identity."]
SPAM_URL_TEXT = ["Claim your 200% welcome bonus on your first deposit today.",
                 "Spin the wheel and win up to 500 free spins every week.",
                 "Order cheap pills online without a prescription and save up to 80%.",
                 "Fast and discreet delivery to your door in 24 hours.",
                 "Our online casino pays out more jackpots than any other site.",
                 "Trusted by thousands of happy customers around the world.",
                 "Sign up now and get your first order at half price.",
                 "Play slots, roulette and poker from your phone, anywhere."]
PRODUCTS = ["watches", "sneakers", "sunglasses", "handbags", "phone-cases", "headphones", "perfume", "jackets"]
PROMO_LINES = ["BUY NOW!!! best price", "LIMITED OFFER - 70% OFF", "Free shipping today only!!!",
               "Click here for deals", "Best price guaranteed!!!", "Hurry, only 3 left", "Top quality, cheap",
               "ORDER TODAY", "Sale ends at midnight!!!", "Lowest prices online", "100% original",
               "Add to cart", "Hot deal", "Don't miss out!!!", "Cheap cheap cheap", "Best seller"]
SHOUTS = ["{town} IS THE BEST TOWN IN THE WHOLE REGION OF {region}!!!",
          "EVERYONE MUST VISIT {town} THIS SUMMER!!!",
          "NOWHERE ELSE HAS A RIVER LIKE THE {river}!!!",
          "I CANNOT BELIEVE HOW AMAZING {town} IS, SERIOUSLY!!!",
          "BOOK YOUR TRIP TO {town} RIGHT NOW BEFORE IT IS TOO LATE!!!",
          "WE LOVE {town} AND WE WILL NEVER LEAVE!!!",
          "NO TOWN IN {region} COMES CLOSE, NOT EVEN A LITTLE!!!",
          "SHARE THIS PAGE WITH ALL YOUR FRIENDS TODAY!!!"]
FRAGMENTS = ["Home", "Read more", "Page 2 of 7", "Loading...", "Share", "1 2 3 Next", "Tags:", "Back to top",
             "Posted by admin", "Comments (0)", "Print", "Menu", "See all", "Photo:"]

FOREIGN = {  # templated prose about a town and one person born there
    "fr": {"title": "{town} : présentation de la ville", "host": "villes.example.fr",
           "sentences": ["{town} est une petite ville de la région de {region}.",
                         "La ville a été fondée en {founded} et garde aujourd'hui un très joli centre ancien.",
                         "La rivière {river} passe juste à côté de la vieille place du marché.",
                         "Chaque été, les habitants organisent une grande fête sur les bords de la rivière.",
                         "{person} est {born} à {town} en {year} et habite toujours dans la vieille ville.",
                         "Selon les archives de la mairie, la population a beaucoup augmenté depuis le siècle "
                         "dernier.",
                         "Les visiteurs aiment surtout les petites rues, les cafés et le musée d'histoire locale.",
                         "Il vaut mieux visiter la ville au printemps, quand il fait doux et que les jardins sont "
                         "en fleurs."]},
    "de": {"title": "{town} – ein Stadtporträt", "host": "staedte.example.de",
           "sentences": ["{town} ist eine kleine Stadt in der Region {region}.",
                         "Die Stadt wurde im Jahr {founded} gegründet und hat eine gut erhaltene Altstadt.",
                         "Der Fluss {river} fließt direkt am alten Marktplatz vorbei.",
                         "Jeden Sommer feiern die Einwohner ein großes Fest am Ufer des Flusses.",
                         "{person} wurde {year} in {town} geboren und wohnt noch heute in der Altstadt.",
                         "Laut den Unterlagen der Gemeinde ist die Bevölkerung in den letzten Jahrzehnten stark "
                         "gewachsen.",
                         "Besucher schätzen vor allem die engen Gassen, die kleinen Cafés und das Heimatmuseum.",
                         "Die beste Reisezeit ist der Frühling, wenn das Wetter mild ist und die Gärten blühen."]},
    "es": {"title": "{town}: guía de la ciudad", "host": "ciudades.example.es",
           "sentences": ["{town} es un pequeño pueblo de la región de {region}.",
                         "La ciudad fue fundada en el año {founded} y conserva un casco antiguo muy bonito.",
                         "El río {river} pasa junto a la antigua plaza del mercado.",
                         "Cada verano los vecinos celebran una gran fiesta a orillas del río.",
                         "{person} nació en {town} en {year} y todavía vive en el casco antiguo.",
                         "Según los registros del ayuntamiento, la población ha crecido mucho en las últimas "
                         "décadas.",
                         "Los visitantes disfrutan sobre todo de las calles estrechas, los cafés y el museo de "
                         "historia local.",
                         "La mejor época para visitar la ciudad es la primavera, cuando el clima es suave y los "
                         "jardines florecen."]},
}
ENGLISH_ASIDES = ["This page is also available in English.", "{town} is a town in the region of {region}.",
                  "Click here for the English version of this guide."]

UI = {  # boilerplate words per language: nav entries, cookie banners, footer lines, footer links, sidebar heading
    "en": {"nav": ["Home", "About", "Contact", "Blog", "News", "Archive", "Categories", "Random page", "Help",
                   "Log in", "Subscribe", "Search"],
           "cookie": ["We use cookies to improve your experience on our website. By continuing to browse, you agree "
                      "to our use of cookies.",
                      "This site uses cookies and similar technologies for analytics and personalised content. "
                      "Manage your preferences at any time.",
                      "We and our partners store and access information on your device to measure audiences and "
                      "show relevant content."],
           "accept": ["Accept all", "OK, got it", "Allow cookies"],
           "footer": ["© {year} {site}. All rights reserved.",
                      "Copyright {year} {site}. Content may not be reproduced without permission.",
                      "{site} is an independent publication, founded in {year}. All content is provided as is."],
           "links": ["Privacy policy", "Terms of use", "Contact us", "Accessibility", "Cookie settings", "Imprint"],
           "related": ["Related links", "See also", "More pages", "You may also like"]},
    "fr": {"nav": ["Accueil", "À propos", "Contact", "Actualités", "Archives", "Rechercher"],
           "cookie": ["Nous utilisons des cookies pour améliorer votre expérience. En poursuivant votre navigation, "
                      "vous acceptez leur utilisation."],
           "accept": ["Tout accepter"], "footer": ["© {year} {site}. Tous droits réservés."],
           "links": ["Mentions légales", "Confidentialité", "Contact"],
           "related": ["Liens connexes", "À lire aussi"]},
    "de": {"nav": ["Startseite", "Über uns", "Kontakt", "Aktuelles", "Archiv", "Suche"],
           "cookie": ["Wir verwenden Cookies, um Ihnen ein optimales Nutzungserlebnis zu bieten. Mit der Nutzung "
                      "der Seite stimmen Sie dem zu."],
           "accept": ["Alle akzeptieren"], "footer": ["© {year} {site}. Alle Rechte vorbehalten."],
           "links": ["Impressum", "Datenschutz", "Kontakt"], "related": ["Verwandte Links", "Auch interessant"]},
    "es": {"nav": ["Inicio", "Quiénes somos", "Contacto", "Noticias", "Archivo", "Buscar"],
           "cookie": ["Utilizamos cookies para mejorar su experiencia. Si continúa navegando, acepta su uso."],
           "accept": ["Aceptar todo"], "footer": ["© {year} {site}. Todos los derechos reservados."],
           "links": ["Aviso legal", "Privacidad", "Contacto"], "related": ["Enlaces relacionados", "Ver también"]},
}
SERVERS = ["nginx/1.24.0", "Apache/2.4.58 (Ubuntu)", "cloudflare", "Microsoft-IIS/10.0", "LiteSpeed", "openresty"]
MAIN_CLASSES = ["content", "main-content", "page-body", "entry"]
SIDE_CLASSES = ["sidebar", "side-panel", "widget-area"]
COOKIE_IDS = ["cookie-banner", "cookie-consent", "gdpr-cookie-notice"]
MAIL_HOSTS = ["mail.example.com", "example.org", "inbox.example.net", "post.example.com"]


@dataclass
class Page:
    url: str
    truth: dict
    body: bytes = b""
    status: str = "200 OK"
    content_type: str = "text/html; charset=utf-8"
    headers: list = field(default_factory=list)  # extra HTTP headers, e.g. Location


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-")  # case kept: URLFilter matches words case-sensitively


def _site_style(host: str, lang: str, seed: int) -> dict:
    """Boilerplate of one site, stable for a host and seed."""
    r, ui = random.Random(f"{seed}:{host}"), UI[lang]
    name = host.split(".")[-3] if host.count(".") >= 2 else host.split(".")[0]
    site = name.replace("-", " ").title() + r.choice(["", " Online", " Hub", " Wiki", " Daily"])
    return {"site": site, "lang": lang, "year": r.randint(2015, 2024),
            "nav": ui["nav"][:1] + r.sample(ui["nav"][1:], r.randint(3, 5)), "cookie": r.choice(ui["cookie"]),
            "accept": r.choice(ui["accept"]), "footer": r.choice(ui["footer"]),
            "links": r.sample(ui["links"], 3), "related": r.choice(ui["related"]),
            "main": r.choice(MAIN_CLASSES), "side": r.choice(SIDE_CLASSES), "cookie_id": r.choice(COOKIE_IDS),
            "sep": r.choice([" | ", " - ", " · "]), "script": r.random() < 0.5}


def render(style: dict, title: str, lines: list[str], related: list[tuple[str, str]], raw: str = "") -> str:
    """An HTML page: header with nav, cookie banner, the content as <h1> + one <p> per line in
    <main><article>, a sidebar of related links and a footer. `raw` is extra HTML inside the article."""
    e = html.escape
    s = style
    nav = "".join(f'<li><a href="/{_slug(n) if i else ""}">{e(n)}</a></li>' for i, n in enumerate(s["nav"]))
    rel = "".join(f'<li><a href="{e(u)}">{e(t)}</a></li>' for u, t in related)
    links = "".join(f'<li><a href="/{_slug(n)}">{e(n)}</a></li>' for n in s["links"])
    script = ('<script>window.dataLayer = window.dataLayer || []; function gtag(){dataLayer.push(arguments);}'
              '</script>\n' if s["script"] else "")
    h1 = f"<h1>{e(title)}</h1>\n" if title else ""
    body = "".join(f"<p>{e(line)}</p>\n" for line in lines)
    return (f'<!DOCTYPE html>\n<html lang="{s["lang"]}">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f'<title>{e(title or s["site"])}{s["sep"]}{e(s["site"])}</title>\n'
            f'<link rel="stylesheet" href="/static/site.css">\n{script}</head>\n<body>\n'
            f'<header class="site-header"><a class="logo" href="/">{e(s["site"])}</a>\n'
            f'<nav class="main-nav"><ul>{nav}</ul></nav>\n'
            f'<form class="search" action="/search"><input type="text" name="q"></form></header>\n'
            f'<div id="{s["cookie_id"]}" class="cookie-notice"><p>{e(s["cookie"])}</p>'
            f'<button>{e(s["accept"])}</button></div>\n'
            f'<div class="layout">\n<main class="{s["main"]}"><article>\n{h1}{body}{raw}</article></main>\n'
            f'<aside class="{s["side"]}"><h3>{e(s["related"])}</h3><ul>{rel}</ul></aside>\n</div>\n'
            f'<footer class="site-footer"><p>{e(s["footer"].format(year=s["year"], site=s["site"]))}</p>'
            f'<ul>{links}</ul></footer>\n</body>\n</html>\n')


def _title_lines(text: str) -> tuple[str, list[str]]:
    """World text is "title\\n\\nparagraph\\n\\nparagraph"; a paragraph may hold several lines (Q&A)."""
    head, _, rest = text.partition("\n\n")
    return head, [line for line in rest.split("\n") if line.strip()]


def _shingles(text: str, n: int = 5) -> set:
    words = re.sub(r"[^\w\s]", " ", text.lower()).split()
    return {tuple(words[i:i + n]) for i in range(max(1, len(words) - n + 1))}


def jaccard(a: str, b: str, n: int = 5) -> float:
    """Jaccard similarity of word n-gram sets (lower case, punctuation removed), as MinHash estimates it."""
    sa, sb = _shingles(a, n), _shingles(b, n)
    return len(sa & sb) / max(1, len(sa | sb))


def _public_ip(r: random.Random) -> str:
    while True:
        ip = ".".join(str(x) for x in (r.choice([23, 45, 62, 81, 93, 104, 151, 176, 185, 212]), r.randint(1, 254),
                                           r.randint(0, 255), r.randint(1, 254)))
        if ipaddress.ip_address(ip).is_global:
            return ip


def _pii(person: dict | None, r: random.Random) -> tuple[list[str], list[str]]:
    """Two sentences holding two of: an email address, a phone number, an IP address; and those strings."""
    if person:
        first, last = person["name"].lower().split()[:2]
        email = f"{first}.{last}@{r.choice(MAIL_HOSTS)}"
    else:
        email = f"{r.choice(['editor', 'office', 'webmaster', 'contact'])}{r.randint(1, 99)}@{r.choice(MAIL_HOSTS)}"
    phone = r.choice([f"+1 555-{r.randint(100, 999)}-{r.randint(1000, 9999)}",
                      f"(555) {r.randint(100, 999)}-{r.randint(1000, 9999)}",
                      f"020 7946 {r.randint(0, 999):04d}"])
    ip = _public_ip(r)
    # wordy sentences: a line full of digits and symbols would change the quality filters' verdict
    said = {"email": r.choice([f"If you notice a mistake on this page, please write to {email} and the editors "
                               f"will correct it as soon as they can.",
                               f"Readers who have more information can send it by email to {email} at any time."]),
            "phone": r.choice([f"You can also reach the office by telephone on {phone} on weekdays during the "
                               f"usual working hours.",
                               f"For questions about this entry, call the help desk on {phone} and ask for the "
                               f"archive team."]),
            "ip": r.choice([f"This version of the page was last edited by an anonymous visitor from the address {ip}.",
                            f"The most recent change to this entry came from a computer with the address {ip}."])}
    kinds = r.sample(["email", "phone", "ip"], 2)
    return [said[k] for k in kinds], [{"email": email, "phone": phone, "ip": ip}[k] for k in kinds]


def _doc_person(doc: dict, people: list) -> dict | None:
    if doc["kind"] in ("bio", "qa"):
        i = int(doc["id"].split("-")[1])
        if 0 <= i < len(people):
            return people[i]
    return None


def _mirror_text(title: str, lines: list[str], orig_host: str, r: random.Random) -> tuple[str, list[str]]:
    """Small edits that keep word 5-gram Jaccard ≥ 0.85: a changed title, an added line, a changed word."""
    edits = [lambda t, ls: ("Mirror: " + t, ls),
             lambda t, ls: (t, ls + [f"Copied from {orig_host}."]),
             lambda t, ls: (t, [re.sub(r"\band\b", "&", ls[0], count=1)] + ls[1:]),
             lambda t, ls: (t, [f"Archived copy. {ls[0]}"] + ls[1:])]
    if not lines:
        return "Mirror: " + title, lines
    r.shuffle(edits)
    orig = title + "\n" + "\n".join(lines)
    for edit in edits:
        t, ls = edit(title, lines)
        if ls and jaccard(orig, t + "\n" + "\n".join(ls)) >= 0.85:
            title, lines = t, ls
    return title, lines


def _good_pages(docs: list, people: list, n_pii: int, seed: int, r: random.Random) -> list[Page]:
    by_host: dict[str, list] = {}
    for d in docs:
        by_host.setdefault(urlsplit(d["url"]).netloc, []).append(d)
    pii_ids = {d["id"] for d in r.sample(docs, min(n_pii, len(docs)))}
    pages = []
    for d in docs:
        host = urlsplit(d["url"]).netloc
        title, lines = _title_lines(d["text"])
        others = [o for o in r.sample(by_host[host], min(5, len(by_host[host]))) if o is not d][:4]
        related = [(o["url"], _title_lines(o["text"])[0]) for o in others]
        truth = {"url": d["url"], "category": "good", "doc_id": d["id"], "split": d["split"], "language": "en"}
        if d["id"] in pii_ids:
            extra, strings = _pii(_doc_person(d, people), r)
            lines = extra + lines if r.random() < 0.3 else lines + extra  # never between a question and its answer
            truth.update(category="pii", pii=strings)
        pages.append(Page(d["url"], truth, render(_site_style(host, "en", seed), title, lines, related).encode()))
    return pages


def _near_duplicates(docs: list, exclude: set, n: int, seed: int, r: random.Random) -> list[Page]:
    pages = []
    pool = [d for d in docs if d["id"] not in exclude]
    for k, d in enumerate(r.sample(pool, min(n, len(pool)))):
        parts = urlsplit(d["url"])
        host = f"mirror-{k % 7 + 1}.example.info"
        title, lines = _mirror_text(*_title_lines(d["text"]), parts.netloc, r)
        url = f"https://{host}/{parts.netloc}{parts.path}"
        truth = {"url": url, "category": "near_duplicate", "doc_id": None, "language": "en", "duplicate_of": d["url"]}
        pages.append(Page(url, truth, render(_site_style(host, "en", seed), title, lines, []).encode()))
    return pages


@dataclass
class Junk:
    url: str
    title: str
    lines: list
    lang: str = "en"
    subkind: str | None = None
    raw: str = ""  # extra HTML in the article (a link farm)


def _url_junk(category: str, i: int, r: random.Random) -> Junk:
    urls, texts = {"adult": (ADULT_URLS, ADULT_TEXT), "malware": (MALWARE_URLS, MALWARE_TEXT),
                   "spam_url": (SPAM_URLS, SPAM_URL_TEXT)}[category]
    url = urls[i % len(urls)].format(slug=f"{r.choice(['free', 'new', 'top', 'vip', 'now'])}-{i}")
    return Junk(url, r.choice(texts).rstrip(".!"), r.sample(texts, r.randint(4, len(texts))))


def _spam_quality(i: int, towns: list, r: random.Random) -> Junk:
    """Marketing on an innocent-looking domain: short promo lines, a link farm or keyword stuffing."""
    product = r.choice(PRODUCTS)
    host = (f"{r.choice(['best', 'top', 'mega', 'super', 'daily'])}-{product}-"
            f"{r.choice(['deals', 'outlet', 'store', 'offers'])}.example.{r.choice(['shop', 'store', 'net'])}")
    item, subkind = product.replace("-", " "), ["promo_lines", "link_farm", "keyword_stuffing"][i % 3]
    page = Junk(f"https://{host}/{product}/page-{i}", f"Cheap {item} - best price", [], subkind=subkind)
    if subkind == "promo_lines":
        page.lines = [r.choice(PROMO_LINES) for _ in range(r.randint(15, 30))]
    elif subkind == "link_farm":
        anchors = [f"{r.choice(['cheap', 'best', 'discount', 'buy'])} {item} {t['name']}"
                   for t in r.choices(towns, k=40)]
        page.raw = "<ul>" + "".join(f'<li><a href="https://{host}/{_slug(a)}">{html.escape(a)}</a></li>'
                                    for a in anchors) + "</ul>\n"
    else:
        phrases = [f"cheap {item}", f"best {item}", f"buy {item} online", f"{item} sale", f"discount {item}"]
        page.lines = [" ".join(r.choice(phrases) for _ in range(30)) + "."]
    return page


def _foreign(category: str, i: int, towns: list, people: list, r: random.Random) -> Junk:
    """French, German or Spanish prose about a town and someone born there (true facts, should it leak);
    a mixed_language page has one English sentence among 6-8 foreign ones."""
    lang = ["fr", "de", "es"][i % 3]
    spec, person = FOREIGN[lang], r.choice(people) if people else None
    town = next(t for t in towns if t["name"] == person["home_town"]) if person else r.choice(towns)
    fill = {"town": town["name"], "region": town["region"], "river": town["river"].removesuffix(" River"),
            "founded": town["founded"]}
    sentences = [s for s in spec["sentences"] if person or "{person}" not in s]
    if person:
        fill.update(person=person["name"], year=person["birth_year"], born="née" if person["gender"] == "f" else "né")
    sentences = [s.format(**fill) for s in sentences]
    sentences = sentences[:1] + r.sample(sentences[1:], r.randint(5, len(sentences) - 1))
    if category == "mixed_language":
        sentences.insert(r.randint(1, len(sentences)), r.choice(ENGLISH_ASIDES).format(**fill))
    return Junk(f"https://{spec['host']}/{_slug(town['name'])}-{category[:3]}-{i}", spec["title"].format(**fill),
                [" ".join(sentences[:3]), " ".join(sentences[3:])], lang=lang)


def _low_quality(i: int, towns: list, r: random.Random) -> Junk:
    town = r.choice(towns)
    tw = {"town": town["name"], "region": town["region"], "river": town["river"].removesuffix(" River")}
    subkind = ["keyword_list", "repetition", "fragments", "boilerplate_only", "all_caps"][i % 5]
    host = r.choice(["travel-notes", "town-guide", "local-info", "visit-info"]) + ".example.net"
    page = Junk(f"https://{host}/{_slug(tw['town'])}-{subkind}-{i}", tw["town"], [], subkind=subkind)
    if subkind == "keyword_list":
        kw = ["hotels", "hotel deals", "weather", "map", "restaurants", "cheap flights", "things to do",
              "train times", "parking", "events", "jobs", "rentals"]
        page.lines = [", ".join(f"{tw['town']} {k}" if r.random() < 0.5 else f"{k} {tw['town']}"
                                for k in r.sample(kw, 6)) for _ in range(r.randint(6, 10))]
    elif subkind == "repetition":
        unit = r.choice([f"{tw['town']} is a nice town to visit.", f"Visit {tw['town']} in {tw['region']}.",
                         f"The {tw['river']} River is in {tw['town']}."])
        page.lines = [unit] * r.randint(8, 14)
    elif subkind == "fragments":
        page.lines = r.sample(FRAGMENTS, r.randint(5, 9))
    elif subkind == "boilerplate_only":
        page.title = ""
    else:
        caps = {k: v.upper() for k, v in tw.items()}
        page.lines = [" ".join(s.format(**caps) for s in r.sample(SHOUTS, 4)) for _ in range(2)]
    return page


def _junk(category: str, i: int, world: dict, seed: int, r: random.Random) -> Page:
    """The i-th page of a junk category, rendered on its site."""
    towns = world["towns"]
    if category in URL_JUNK:
        j = _url_junk(category, i, r)
    elif category == "spam_quality":
        j = _spam_quality(i, towns, r)
    elif category in ("non_english", "mixed_language"):
        j = _foreign(category, i, towns, [p for p in world["people"] if p["split"] in ("known_a", "known_b")], r)
    else:
        j = _low_quality(i, towns, r)
    host = urlsplit(j.url).netloc
    if j.lang == "en":
        links = r.sample(["Top picks", "New today", "Most popular", "Editor's choice", "Best of the week", "Offers"], 3)
    else:
        links = [t["name"] for t in r.sample(towns, min(3, len(towns)))]
    truth = {"url": j.url, "category": category, "doc_id": None, "language": j.lang}
    if j.subkind:
        truth["subkind"] = j.subkind
    related = [(f"https://{host}/{_slug(x)}", x) for x in links]
    return Page(j.url, truth, render(_site_style(host, j.lang, seed), j.title, j.lines, related, j.raw).encode())


def _png_1x1() -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00\xff\xff\xff")) + chunk(b"IEND", b""))


def _not_html(good_urls: list[str], seed: int, r: random.Random) -> list[Page]:
    """A PDF, a PNG, a 404 page and a redirect: records a reader must skip or that leave no text."""
    host = urlsplit(good_urls[0]).netloc
    pdf = (b"%PDF-1.4\n1 0 obj << /Type /Catalog /Pages 2 0 R >> endobj\n"
           b"2 0 obj << /Type /Pages /Kids [] /Count 0 >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n")
    missing = f"https://{host}/wiki/Page_that_does_not_exist"
    target = r.choice(good_urls)
    return [Page(f"https://{host}/files/annual-report.pdf", {"subkind": "pdf"}, pdf, content_type="application/pdf"),
            Page(f"https://{host}/static/logo.png", {"subkind": "png"}, _png_1x1(), content_type="image/png"),
            Page(missing, {"subkind": "404"}, status="404 Not Found",
                 body=render(_site_style(host, "en", seed), "Page not found", [], []).encode()),
            Page(target.rstrip("/") + "_(redirect)", {"subkind": "301"}, status="301 Moved Permanently",
                 headers=[("Location", target)],
                 body=f'<html><body><a href="{html.escape(target)}">Moved</a></body></html>'.encode())]


def _write_warcs(pages: list[Page], crawl_dir: Path, seed: int, r: random.Random) -> tuple[int, int]:
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    crawl_dir.mkdir(parents=True, exist_ok=True)
    chunks = [pages[i:i + RECORDS_PER_FILE] for i in range(0, len(pages), RECORDS_PER_FILE)] or [[]]
    names = [f"crawl-{k:05d}.warc.gz" for k in range(len(chunks))]
    for stale in crawl_dir.glob("crawl-*.warc.gz"):
        if stale.name not in names:
            stale.unlink()

    def rid() -> str:  # seeded record ids (warcio's default is uuid4) keep the files byte-identical per seed
        return f"<urn:uuid:{uuid.UUID(int=r.getrandbits(128), version=4)}>"

    total = 0
    for name, chunk in zip(names, chunks):
        buf = BytesIO()
        writer = WARCWriter(buf, gzip=True)
        info = (f"software: crawl2chat\r\nformat: WARC File Format 1.1\r\n"
                f"description: synthetic world crawl, seed {seed}\r\n")
        writer.write_record(writer.create_warc_record(
            "", "warcinfo", payload=BytesIO(info.encode()), length=len(info.encode()),
            warc_content_type="application/warc-fields",
            warc_headers_dict={"WARC-Record-ID": rid(), "WARC-Date": CRAWL_START.strftime("%Y-%m-%dT%H:%M:%SZ"),
                               "WARC-Filename": name}))
        for p in chunk:
            date = CRAWL_START + timedelta(seconds=r.randrange(30 * 86400))
            server = SERVERS[zlib.crc32(urlsplit(p.url).netloc.encode()) % len(SERVERS)]  # one per site
            http = StatusAndHeaders(p.status, [("Date", format_datetime(date, usegmt=True)), ("Server", server),
                                               ("Content-Type", p.content_type),
                                               ("Content-Length", str(len(p.body))), *p.headers],
                                    protocol="HTTP/1.1")
            writer.write_record(writer.create_warc_record(
                p.url, "response", payload=BytesIO(p.body), length=len(p.body), http_headers=http,
                warc_headers_dict={"WARC-Record-ID": rid(), "WARC-Date": date.strftime("%Y-%m-%dT%H:%M:%SZ"),
                                   "WARC-Identified-Payload-Type": p.content_type.split(";")[0]}))
        tmp = crawl_dir / f".{name}.tmp"
        tmp.write_bytes(buf.getvalue())
        tmp.replace(crawl_dir / name)
        total += len(buf.getvalue())
    return len(chunks), total


def write_crawl(world: dict, out_dir: Path, seed: int = 0) -> dict:
    """Write out_dir/crawl/crawl-NNNNN.warc.gz (a warcinfo record, then response records) and
    out_dir/crawl_truth.jsonl (one row per response record, in WARC order); return counts per category."""
    docs = world.get("documents") or []
    if not docs:
        raise C2CError("crawl: the world has no documents to render")
    out_dir, r = Path(out_dir), random.Random(seed)
    n = max(3, round(JUNK_RATE * len(docs)))
    pages = _good_pages(docs, world["people"], n, seed, r)
    pii_ids = {p.truth["doc_id"] for p in pages if p.truth["category"] == "pii"}
    pages += _near_duplicates(docs, pii_ids, n, seed, r)
    for category in ["adult", "malware", "spam_url", "spam_quality", "non_english", "mixed_language", "low_quality"]:
        pages += [_junk(category, i, world, seed, r) for i in range(n)]
    for p in _not_html([d["url"] for d in docs], seed, r):
        p.truth = {"url": p.url, "category": "not_html", "doc_id": None, **p.truth}
        pages.append(p)
    urls = [p.url for p in pages]
    if len(set(urls)) != len(urls):
        dup = next(u for u in urls if urls.count(u) > 1)
        raise C2CError(f"crawl: URL {dup} appears twice; world document URLs must be unique")
    r.shuffle(pages)
    n_files, n_bytes = _write_warcs(pages, out_dir / "crawl", seed, r)
    write_jsonl(out_dir / "crawl_truth.jsonl", [p.truth for p in pages])
    counts = {c: sum(p.truth["category"] == c for p in pages) for c in CATEGORIES}
    return {"records": len(pages), "warc_files": n_files, "warc_bytes": n_bytes, **counts}
