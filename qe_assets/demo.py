"""Deterministic demo and benchmark quality events (CONTRACT §1) for a RAG support assistant.

`generate_events` fabricates what a producer would capture from an internal knowledge-base
assistant: a question, the retrieved chunks, the answer and the evaluator's verdict. Roughly half
of the events are Chinese and half English; the text comes from small vocabularies in this module,
so no network, data file or third-party package is needed, and the same arguments always give
byte-identical lines.

The stream deliberately carries what a real producer sends, so the pipeline gets exercised:

* labels in English and in their Chinese aliases, sometimes padded or oddly cased, sometimes
  several per event, ~3% none and ~2% a label outside the known set;
* ~10% of docs without a retriever score, and docs in retrieval order, not sorted by score;
* ~1% of events with extra top-level fields (``tenant``, ``channel``...) that must be kept;
* ~2% exact re-sends of an earlier line (at-least-once delivery);
* a ``bad_share`` fraction of malformed lines, cycling through the kinds in `BAD_KINDS`.

Sizes: with the default ``doc_chars=(150, 900)`` and ``docs_per_event=(2, 8)`` an event averages
about 3.3 K characters, ~5.6 KB of UTF-8 (Chinese characters take three bytes). Benchmark callers
that want heavier, more production-like events pass more and longer docs:
``docs_per_event=BENCH_DOCS_PER_EVENT, doc_chars=BENCH_DOC_CHARS`` gives ~7.6 KB of UTF-8
(~4.3 K characters) per event. 100,000 default events take a few seconds on one core.

CLI: ``python -m qe_assets.demo --count N --seed S --bad-share F --out PATH``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import tempfile
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from random import Random
from typing import Any

DEFAULT_START = datetime(2026, 11, 1, tzinfo=UTC)
# Heavier events for benchmarks: ~7-8 KB of UTF-8 each instead of ~5.6 KB.
BENCH_DOCS_PER_EVENT: tuple[int, int] = (3, 9)
BENCH_DOC_CHARS: tuple[int, int] = (200, 1000)

KNOWN_LABELS: tuple[str, ...] = (
    "factuality_error",
    "incomplete_answer",
    "low_relevance",
    "overconfidence",
)
# Mirrors the contract's alias table; overconfidence has two Chinese spellings in the wild.
_ZH_ALIASES: dict[str, tuple[str, ...]] = {
    "factuality_error": ("事实性错误",),
    "incomplete_answer": ("回答不完整",),
    "low_relevance": ("相关性低",),
    "overconfidence": ("可能过度自信", "过度自信"),
}
UNKNOWN_LABELS: tuple[str, ...] = ("hallucinated_citation", "格式错误", "tone_issue", "语气不当")
# Evaluators flag factual and completeness problems more often than tone.
_LABEL_CUMULATIVE: tuple[float, ...] = (0.32, 0.62, 0.86)  # weights .32 .30 .24 .14

BAD_KINDS: tuple[str, ...] = (
    "truncated_json",
    "missing_request_id",
    "blank_request_id",
    "score_out_of_range",
    "score_as_string",
    "docs_not_a_list",
    "doc_without_content",
    "invalid_timestamp",
    "json_array",
)

_EXTRA_FIELDS: tuple[dict[str, Any], ...] = (
    {"tenant": "acme"},
    {"channel": "web"},
    {"tenant": "globex", "channel": "slack"},
    {"app_version": "4.12.0"},
    {"channel": "api", "trace": {"span_id": "7f3a9c", "sampled": True}},
)

_VARIANTS_PER_TOPIC = 4
_SLOT_POOL = 64
# Retries arrive soon after the original, so re-sends copy one of the recent lines.
_RESEND_WINDOW = 200


@dataclass(frozen=True, slots=True)
class _Texts:
    title: str
    questions: tuple[str, ...]
    facts: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class _Language:
    code: str
    joiner: str
    cite_sep: str
    fillers: tuple[str, ...]
    answers: tuple[str, ...]
    vague: tuple[str, ...]
    sure_prefix: str
    plans: tuple[str, ...]
    teams: tuple[str, ...]
    regions: tuple[str, ...]
    amounts: tuple[int, ...]


_EN = _Language(
    code="en",
    joiner=" ",
    cite_sep=" ",
    fillers=(
        "This article was last reviewed by {team} on {date}.",
        "If the steps above do not help, contact {team} through the service desk.",
        "The same rules apply to contractors unless their contract says otherwise.",
        "Related articles are listed in the {topic} section of the knowledge base.",
        "Changes to this policy are announced in the internal newsletter.",
        "Screenshots in this article show the {region} version of the console.",
    ),
    answers=(
        "According to the knowledge base: {fact}",
        "{fact} {fact2}",
        "Here is what the policy says. {fact}",
        "{fact} If that does not cover your case, please contact {team}.",
        "As far as I can tell: {fact}",
    ),
    vague=(
        "It depends on your plan and region.",
        "Please check the knowledge base for the details.",
        "There are a few conditions; see the policy page.",
        "Usually yes, but there are exceptions.",
    ),
    sure_prefix="Definitely, and this always applies: ",
    plans=("Basic", "Pro", "Team", "Enterprise"),
    teams=(
        "Finance",
        "the IT help desk",
        "People Ops",
        "the platform team",
        "Security",
        "Billing support",
    ),
    regions=("Europe", "North America", "Asia-Pacific", "Latin America"),
    amounts=(50, 100, 200, 500, 1000),
)

_ZH = _Language(
    code="zh",
    joiner="",
    cite_sep="",
    fillers=(
        "本文最近一次由{team}于{date}审核。",
        "如果以上步骤无法解决问题，请通过服务台联系{team}。",
        "除合同另有约定外，外包人员同样适用以上规定。",
        "更多内容请参阅知识库“{topic}”分类下的相关文章。",
        "本政策的调整会在内部通讯中公布。",
        "文中截图均来自{region}版本的控制台。",
    ),
    answers=(
        "根据知识库：{fact}",
        "{fact}{fact2}",
        "相关规定如下：{fact}",
        "{fact}如仍有疑问，请联系{team}。",
        "据我所知，{fact}",
    ),
    vague=(
        "这要看您的套餐和所在区域。",
        "具体细节请查阅知识库。",
        "有一些限制条件，请参考相关政策。",
        "一般可以，但也有例外。",
    ),
    sure_prefix="毫无疑问，以下规定在任何情况下都适用：",
    plans=("基础版", "专业版", "团队版", "企业版"),
    teams=("财务部", "IT 服务台", "人力资源部", "平台组", "安全组", "计费支持组"),
    regions=("华东", "华北", "华南", "海外"),
    amounts=(300, 500, 1000, 2000, 5000),
)

_LANGUAGES: tuple[_Language, ...] = (_EN, _ZH)

# One entry per knowledge-base topic: (English texts, Chinese texts), same facts in both.
_TOPICS: tuple[tuple[_Texts, _Texts], ...] = (
    (
        _Texts(
            "Refund policy",
            (
                "How long does a refund take on the {plan} plan?",
                "Can I still get a refund after {days} days?",
                "Who approves refunds above {amount} USD?",
                "Why was my refund request rejected?",
            ),
            (
                "Refunds on the {plan} plan go back to the original payment method within "
                "{days} business days.",
                "Requests filed more than {days} days after purchase need approval from {team}.",
                "Refunds above {amount} USD need a second approver before the money is released.",
                "Partial refunds are calculated per remaining day of the billing period.",
                "Orders paid with a voucher cannot be refunded automatically and are rejected.",
                "Customers can follow the refund status under Billing > Orders in the console.",
            ),
        ),
        _Texts(
            "退款政策",
            (
                "{plan}的退款一般多久到账？",
                "购买超过{days}天还能申请退款吗？",
                "超过{amount}元的退款由谁审批？",
                "我的退款申请为什么被驳回了？",
            ),
            (
                "{plan}的退款会在{days}个工作日内原路退回。",
                "购买{days}天后提交的退款申请需要{team}审批。",
                "金额超过{amount}元的退款需要第二位审批人确认后才会放款。",
                "部分退款按照计费周期内剩余天数折算。",
                "使用代金券支付的订单无法自动退款，系统会直接驳回。",
                "用户可以在控制台“账单 > 订单”页面查看退款进度。",
            ),
        ),
    ),
    (
        _Texts(
            "API rate limits",
            (
                "What is the API rate limit on the {plan} plan?",
                "Why am I getting HTTP 429 from the API?",
                "Can {team} raise our limit to {limit} requests per minute?",
                "How is the API rate limit counted across regions?",
            ),
            (
                "The {plan} plan allows {limit} requests per minute per API key.",
                "Clients that exceed the limit receive HTTP 429 with a Retry-After header.",
                "Limits are counted per region, so traffic in {region} does not use up the quota "
                "of other regions.",
                "Bursts are smoothed by a token bucket that refills every second.",
                "Temporary increases are granted by {team} for up to {days} days.",
                "Batch endpoints count as one request no matter how many items they carry.",
            ),
        ),
        _Texts(
            "API 限流",
            (
                "{plan}的 API 调用频率上限是多少？",
                "为什么调用接口时返回 429？",
                "能否请{team}把我们的限额提高到每分钟{limit}次？",
                "不同区域的 API 限流是怎么计算的？",
            ),
            (
                "{plan}每个 API 密钥每分钟最多可调用{limit}次。",
                "超过限额的请求会返回 HTTP 429，并在 Retry-After 头中给出重试时间。",
                "限流按区域分别计算，{region}的流量不会占用其他区域的额度。",
                "突发流量由令牌桶平滑处理，令牌每秒补充一次。",
                "临时提额由{team}审批，最长有效{days}天。",
                "批量接口无论包含多少条数据都只计为一次调用。",
            ),
        ),
    ),
    (
        _Texts(
            "VPN setup",
            (
                "How do I set up the VPN on a new laptop?",
                "The VPN disconnects every {hours} hours, is that expected?",
                "Which VPN gateway should I use in {region}?",
                "Why does the VPN client say my certificate has expired?",
            ),
            (
                "Install the VPN client from the self-service portal and sign in with your "
                "company account.",
                "Sessions are closed after {hours} hours and must be authenticated again.",
                "Staff working in {region} should pick the regional gateway to cut latency.",
                "Device certificates renew every {days} days while the laptop is on the "
                "corporate network.",
                "If the certificate has expired, open a ticket with {team} to have it reissued.",
                "Split tunnelling is disabled, so all traffic goes through the VPN while "
                "connected.",
            ),
        ),
        _Texts(
            "VPN 配置",
            (
                "新电脑怎么配置公司 VPN？",
                "VPN 每隔{hours}小时就断开，这正常吗？",
                "在{region}办公应该选哪个 VPN 网关？",
                "VPN 客户端提示证书过期怎么办？",
            ),
            (
                "请从自助服务门户安装 VPN 客户端，并使用公司账号登录。",
                "VPN 会话在连续使用{hours}小时后自动断开，需要重新认证。",
                "在{region}办公的同事应选择就近网关，以降低延迟。",
                "连接公司网络时，设备证书每{days}天自动续期一次。",
                "证书过期后，请向{team}提交工单重新签发。",
                "系统禁用了分流，连接 VPN 期间所有流量都会经过公司网关。",
            ),
        ),
    ),
    (
        _Texts(
            "Leave policy",
            (
                "How many days of annual leave do I get in my first year?",
                "Can I carry over more than {days} days of unused leave?",
                "Who do I notify when I take sick leave?",
                "How far in advance must I request {n} days of leave?",
            ),
            (
                "Full-time employees receive {n} days of paid annual leave per calendar year.",
                "Up to {days} days of unused leave can be carried into the next year.",
                "Sick leave must be reported to your manager and {team} on the first day.",
                "Requests for more than {n} consecutive days need approval two weeks ahead.",
                "Leave balances are shown in the HR portal and refreshed every night.",
                "Parental leave is handled separately and does not reduce the annual allowance.",
            ),
        ),
        _Texts(
            "请假制度",
            (
                "入职第一年有多少天年假？",
                "没休完的年假能结转超过{days}天吗？",
                "请病假需要通知谁？",
                "请{n}天假需要提前多久申请？",
            ),
            (
                "全职员工每个自然年享有{n}天带薪年假。",
                "未使用的年假最多可结转{days}天到下一年。",
                "请病假需在缺勤当天告知直属经理和{team}。",
                "连续请假超过{n}天的，需至少提前两周提交审批。",
                "假期余额可在人事系统中查看，每晚自动更新。",
                "育儿假单独计算，不占用年假额度。",
            ),
        ),
    ),
    (
        _Texts(
            "Invoices",
            (
                "Where can I download last month's invoice?",
                "How do I change the company name on an invoice?",
                "Why does the invoice differ from the {plan} plan price?",
                "Can {team} reissue an invoice older than {days} days?",
            ),
            (
                "Invoices are generated on the first day of each month and can be downloaded "
                "from the billing page.",
                "The company name and tax number can be edited until the invoice is issued.",
                "The invoice adds usage charges on top of the {plan} plan base fee.",
                "Invoices older than {days} days can only be reissued by {team}.",
                "Each invoice lists the tax rate that applies in {region}.",
                "A paid invoice is never edited; a credit note is issued instead.",
            ),
        ),
        _Texts(
            "发票",
            (
                "上个月的发票在哪里下载？",
                "发票抬头写错了怎么修改？",
                "为什么发票金额和{plan}的标价不一样？",
                "超过{days}天的发票还能让{team}重开吗？",
            ),
            (
                "发票在每月1日生成，可以在账单页面下载。",
                "发票开具前可以修改公司抬头和税号。",
                "发票金额包含{plan}基础费用以及按量计费部分。",
                "开具超过{days}天的发票只能由{team}重新开具。",
                "每张发票都会标注{region}适用的税率。",
                "已付款的发票不能修改，只能开具红字发票冲销。",
            ),
        ),
    ),
    (
        _Texts(
            "Password reset",
            (
                "How do I reset my password if I lost my phone?",
                "Why does the reset link say it has expired?",
                "How often do I have to change my password?",
                "My account is locked after {n} failed attempts, what now?",
            ),
            (
                "Use the Forgot password link on the sign-in page to receive a reset email.",
                "Reset links expire after {hours} hours and work only once.",
                "Passwords must be changed every {days} days and cannot repeat the last five.",
                "Accounts are locked for 30 minutes after {n} failed sign-in attempts.",
                "If you lost your second-factor device, {team} can verify you by video call.",
                "New passwords need at least twelve characters, including a digit and a symbol.",
            ),
        ),
        _Texts(
            "密码重置",
            (
                "手机丢了怎么重置密码？",
                "重置链接为什么提示已过期？",
                "密码多久需要更换一次？",
                "连续输错{n}次密码账号被锁了怎么办？",
            ),
            (
                "在登录页点击“忘记密码”即可收到重置邮件。",
                "重置链接在{hours}小时后失效，且只能使用一次。",
                "密码每{days}天必须更换一次，且不能与最近五次相同。",
                "连续{n}次登录失败后，账号将被锁定30分钟。",
                "如果丢失了二次验证设备，{team}可以通过视频通话核实身份。",
                "新密码至少12位，且必须包含数字和符号。",
            ),
        ),
    ),
    (
        _Texts(
            "Data retention",
            (
                "How long do you keep application logs?",
                "Is our data deleted when the {plan} subscription ends?",
                "Can we keep audit records longer than {days} days?",
                "Where are backups stored for customers in {region}?",
            ),
            (
                "Application logs are kept for {days} days and then deleted automatically.",
                "Customer data is erased {days} days after a {plan} subscription ends.",
                "Audit records are retained for {n} years to meet regulatory requirements.",
                "Backups for customers in {region} stay in that region and are encrypted at rest.",
                "Extended retention can be requested from {team} for an additional fee.",
                "Deletion requests are confirmed by email once every copy has been removed.",
            ),
        ),
        _Texts(
            "数据保留",
            (
                "应用日志会保存多久？",
                "{plan}订阅到期后客户数据会被删除吗？",
                "审计记录能保存超过{days}天吗？",
                "{region}客户的备份数据存放在哪里？",
            ),
            (
                "应用日志保存{days}天后自动删除。",
                "{plan}订阅结束{days}天后，客户数据将被彻底清除。",
                "审计记录保留{n}年，以满足监管要求。",
                "{region}客户的备份存放在同一区域，并进行静态加密。",
                "如需延长保留期限，可向{team}申请，另行收费。",
                "所有副本删除完成后，系统会发送邮件确认。",
            ),
        ),
    ),
    (
        _Texts(
            "Expense reimbursement",
            (
                "How do I submit a taxi receipt for reimbursement?",
                "What is the daily meal allowance for trips to {region}?",
                "When will my expense claim be paid?",
                "Do expenses over {amount} USD need approval from {team}?",
            ),
            (
                "Expense claims are filed in the finance app with a photo of every receipt.",
                "The meal allowance for trips to {region} is {amount} USD per day.",
                "Approved claims are paid with the next payroll run, usually within {days} days.",
                "Expenses above {amount} USD need pre-approval from {team}.",
                "Receipts older than {days} days are not accepted.",
                "Alcohol and personal entertainment are never reimbursed.",
            ),
        ),
        _Texts(
            "费用报销",
            (
                "打车发票怎么提交报销？",
                "去{region}出差的每日餐补是多少？",
                "报销款什么时候到账？",
                "超过{amount}元的费用需要{team}审批吗？",
            ),
            (
                "报销单在财务系统中提交，每张票据需拍照上传。",
                "前往{region}出差的餐补标准为每天{amount}元。",
                "审批通过的报销款随下一次工资发放，通常在{days}天内到账。",
                "超过{amount}元的支出需事先获得{team}批准。",
                "超过{days}天的票据不予受理。",
                "酒水和个人娱乐消费一律不予报销。",
            ),
        ),
    ),
    (
        _Texts(
            "Single sign-on",
            (
                "How do I connect our identity provider for SSO?",
                "Why are new users not provisioned after enabling SSO?",
                "Is SSO available on the {plan} plan?",
                "How long is an SSO session valid?",
            ),
            (
                "SSO supports SAML 2.0 and OpenID Connect identity providers.",
                "Users are provisioned on first sign-in unless SCIM sync is enabled.",
                "SSO is included in the {plan} plan and above.",
                "SSO sessions last {hours} hours before the identity provider is asked again.",
                "The company domain must be verified by {team} before SSO can be enforced.",
                "Break-glass accounts keep password sign-in in case the identity provider is down.",
            ),
        ),
        _Texts(
            "单点登录",
            (
                "怎么把公司的身份提供商接入单点登录？",
                "开启 SSO 后新用户为什么没有自动开通？",
                "{plan}支持单点登录吗？",
                "SSO 会话有效期是多久？",
            ),
            (
                "单点登录支持 SAML 2.0 和 OpenID Connect 身份提供商。",
                "未开启 SCIM 同步时，用户在首次登录时自动开通。",
                "{plan}及以上版本包含单点登录功能。",
                "SSO 会话有效期为{hours}小时，到期后会重新向身份提供商认证。",
                "强制启用 SSO 之前，需要由{team}验证公司域名。",
                "应急账号保留密码登录，以防身份提供商故障。",
            ),
        ),
    ),
)


_JSON_ESCAPED = re.compile(r'["\\\x00-\x1f]')  # what json.dumps escapes with ensure_ascii=False


@dataclass(frozen=True, slots=True)
class _Corpus:
    """One knowledge-base article long enough to cut any allowed chunk from many offsets.

    Doc contents are slices of `text`. Serialising them was most of the cost of an event, so the
    article is JSON-escaped once and a slice's JSON is the matching slice of `escaped`.
    """

    text: str
    starts: tuple[int, ...]  # sentence starts from which a chunk of maximum length still fits
    escaped: str
    escape_at: tuple[int, ...]  # positions in `text` of the characters JSON escapes...
    escape_extra: tuple[int, ...]  # ...and the characters escaping added before each one

    @classmethod
    def build(cls, text: str, starts: tuple[int, ...]) -> _Corpus:
        positions: list[int] = []
        extra = [0]
        for match in _JSON_ESCAPED.finditer(text):
            positions.append(match.start())
            extra.append(extra[-1] + len(json.dumps(match.group(), ensure_ascii=False)) - 3)
        return cls(
            text=text,
            starts=starts,
            escaped=json.dumps(text, ensure_ascii=False)[1:-1],
            escape_at=tuple(positions),
            escape_extra=tuple(extra),
        )

    def escaped_offset(self, position: int) -> int:
        return position + self.escape_extra[bisect_left(self.escape_at, position)]


@dataclass(frozen=True, slots=True)
class _Chunk:
    """A retrievable chunk start; its id is stable, like a row of a real KB index."""

    doc_id: str
    corpus: _Corpus
    start: int
    escaped_start: int


def _slot_pool(rng: Random, lang: _Language) -> list[dict[str, Any]]:
    # Drawing slot values once into a pool keeps the per-event cost at a single draw.
    pool: list[dict[str, Any]] = []
    for _ in range(_SLOT_POOL):
        day = datetime(2026, 1, 1) + timedelta(days=rng.randrange(300))
        pool.append(
            {
                "plan": rng.choice(lang.plans),
                "team": rng.choice(lang.teams),
                "region": rng.choice(lang.regions),
                "amount": rng.choice(lang.amounts),
                "days": rng.choice((7, 14, 30, 60, 90)),
                "hours": rng.choice((8, 10, 12, 24)),
                "n": rng.randint(3, 15),
                "limit": rng.choice((60, 120, 600, 1200, 6000)),
                "date": day.strftime("%Y-%m-%d"),
            }
        )
    return pool


def _build_corpus(
    rng: Random,
    lang: _Language,
    texts: _Texts,
    slots: list[dict[str, Any]],
    max_chars: int,
) -> _Corpus:
    # Twice the longest chunk plus slack leaves plenty of distinct sentence-aligned offsets.
    target = 2 * max_chars + 400
    parts: list[str] = [texts.title]
    offsets: list[int] = [0]
    length = len(texts.title)
    separator = "\n\n"
    deck: list[str] = []
    while length < target:
        if not deck:
            # Dealing shuffled decks spreads repeats evenly instead of clustering one fact.
            deck = list(texts.facts) * 3 + list(lang.fillers)
            rng.shuffle(deck)
        sentence = deck.pop().format(topic=texts.title, **rng.choice(slots))
        parts.append(separator)
        length += len(separator)
        offsets.append(length)
        parts.append(sentence)
        length += len(sentence)
        # Occasional paragraph breaks, like the markdown articles chunks are cut from.
        separator = "\n\n" if rng.random() < 0.15 else lang.joiner
    text = "".join(parts)
    starts = tuple(o for o in offsets if o + max_chars <= len(text))
    return _Corpus.build(text, starts)


# (chunk, end of the content in chunk.corpus.text, score or None): a doc before it is rendered.
_DocSpec = tuple[_Chunk, int, float | None]
_ENCODER = json.JSONEncoder(ensure_ascii=False)  # json.dumps builds a new encoder per call


@dataclass(slots=True)
class _Event:
    head: dict[str, Any]  # the fields serialised before "docs"
    docs: list[_DocSpec]
    tail: dict[str, Any]  # the fields serialised after "docs"

    def as_dict(self) -> dict[str, Any]:
        docs: list[dict[str, Any]] = []
        for chunk, end, score in self.docs:
            doc: dict[str, Any] = {
                "id": chunk.doc_id,
                "content": chunk.corpus.text[chunk.start : end],
            }
            if score is not None:
                doc["score"] = score
            docs.append(doc)
        return {**self.head, "docs": docs, **self.tail}

    def to_json(self) -> str:
        """Exactly `json.dumps(self.as_dict(), ensure_ascii=False)`, several times faster."""
        # One flat join: every concatenation or f-string would copy the long contents again.
        parts: list[str] = [_ENCODER.encode(self.head)[:-1], ', "docs": [']
        separator = '{"id": "'
        for chunk, end, score in self.docs:
            corpus = chunk.corpus
            parts += (
                separator,
                chunk.doc_id,
                '", "content": "',
                corpus.escaped[chunk.escaped_start : corpus.escaped_offset(end)],
                '"}' if score is None else f'", "score": {score!r}}}',
            )
            separator = ', {"id": "'
        parts += ("], ", _ENCODER.encode(self.tail)[1:])
        return "".join(parts)


class _Generator:
    def __init__(
        self,
        seed: int,
        doc_chars: tuple[int, int],
        docs_per_event: tuple[int, int],
    ) -> None:
        self.rng = Random(seed)
        self.seed = seed
        self.doc_lo, self.doc_hi = doc_chars
        self.docs_lo, self.docs_hi = docs_per_event
        self.slots = [_slot_pool(self.rng, lang) for lang in _LANGUAGES]
        # chunks[lang][topic]: every chunk start of every variant article, so one draw picks a doc.
        self.chunks: list[list[list[_Chunk]]] = []
        next_id = 1
        for li, lang in enumerate(_LANGUAGES):
            per_topic: list[list[_Chunk]] = []
            for topic in _TOPICS:
                chunks: list[_Chunk] = []
                for _ in range(_VARIANTS_PER_TOPIC):
                    corpus = _build_corpus(self.rng, lang, topic[li], self.slots[li], self.doc_hi)
                    for at in corpus.starts:
                        chunks.append(
                            _Chunk(f"kb-{next_id}", corpus, at, corpus.escaped_offset(at))
                        )
                        next_id += 1
                per_topic.append(chunks)
            self.chunks.append(per_topic)

    # Random.randrange/choice are pure Python and dominate the profile; int(random() * k) draws
    # the same distribution (bar a 2**-53 bias) an order of magnitude faster.

    def _labels(self, li: int) -> tuple[list[str], set[str]]:
        rng = self.rng
        rand = rng.random
        roll = rand()
        if roll < 0.03:
            canonical: list[str] = []
        else:
            first = KNOWN_LABELS[bisect_right(_LABEL_CUMULATIVE, rand())]
            extra = 0 if roll < 0.80 else (1 if roll < 0.95 else 2)
            rest = [label for label in KNOWN_LABELS if label != first]
            canonical = [first, *rng.sample(rest, extra)] if extra else [first]
        labels: list[str] = []
        for label in canonical:
            # Chinese evaluators mostly emit the aliases; English ones occasionally do too.
            if rand() < (0.75 if li == 1 else 0.08):
                aliases = _ZH_ALIASES[label]
                text = aliases[int(rand() * len(aliases))]
                if rand() < 0.03:
                    text = f" {text} "
            else:
                text = label
                messy = rand()
                if messy < 0.03:
                    text = f" {label.title()} "
                elif messy < 0.05:
                    text = label.upper()
                elif messy < 0.07:
                    text = f"{label} "
            labels.append(text)
        if rand() < 0.02:
            unknown = UNKNOWN_LABELS[int(rand() * len(UNKNOWN_LABELS))]
            if labels and rand() < 0.5:
                labels.insert(0, unknown)
            else:
                labels.append(unknown)
        return labels, set(canonical)

    def event(self, index: int, timestamp: str) -> _Event:
        rng = self.rng
        rand = rng.random
        n_topics = len(_TOPICS)
        li = 0 if rand() < 0.5 else 1
        lang = _LANGUAGES[li]
        ti = int(rand() * n_topics)
        texts = _TOPICS[ti][li]
        slots = self.slots[li][int(rand() * _SLOT_POOL)]
        labels, canonical = self._labels(li)
        # Triangular around 0.45 puts about half of the events on each side of the 0.4 line
        # where score * 1.5 crosses the default 0.6 confidence gate.
        score = min(699, int(rng.triangular(0, 700, 450))) / 1000

        off_topic_share = 0.55 if "low_relevance" in canonical else 0.15
        chunks_by_topic = self.chunks[li]
        docs: list[_DocSpec] = []
        doc_lo, span = self.doc_lo, self.doc_hi - self.doc_lo + 1
        for _ in range(self.docs_lo + int(rand() * (self.docs_hi - self.docs_lo + 1))):
            # One uniform draw decides both whether the doc is off topic and, rescaled, which
            # topic; likewise below for whether it has a score and the score itself.
            roll = rand()
            off_topic = roll < off_topic_share
            topic = min(n_topics - 1, int(roll / off_topic_share * n_topics)) if off_topic else ti
            chunks = chunks_by_topic[topic]
            chunk = chunks[int(rand() * len(chunks))]
            end = chunk.start + doc_lo + int(rand() * span)
            roll = rand()
            doc_score: float | None = None
            if roll >= 0.10:
                low, high = (0.08, 0.55) if off_topic else (0.45, 0.97)
                doc_score = round(low + (high - low) * (roll - 0.10) / 0.90, 4)
            docs.append((chunk, end, doc_score))

        if "incomplete_answer" in canonical and rand() < 0.7:
            answer = lang.vague[int(rand() * len(lang.vague))]
        else:
            source = _TOPICS[int(rand() * n_topics)][li] if "low_relevance" in canonical else texts
            facts = source.facts
            answer = lang.answers[int(rand() * len(lang.answers))].format(
                fact=facts[int(rand() * len(facts))].format(**slots),
                fact2=facts[int(rand() * len(facts))].format(**slots),
                team=slots["team"],
            )
        if "overconfidence" in canonical:
            answer = lang.sure_prefix + answer
        cites = bool(docs) and rand() < 0.6
        if cites:
            picked = rng.sample(docs, min(len(docs), 1 + int(rand() * 2)))
            answer += lang.cite_sep + "".join(f"[{d[0].doc_id}]" for d in picked)

        head: dict[str, Any] = {
            "request_id": f"demo-{self.seed}-{index:07d}",
            "timestamp": timestamp,
            "question": texts.questions[int(rand() * len(texts.questions))].format(**slots),
        }
        tail: dict[str, Any] = {
            "answer": answer,
            "evaluation": {
                "score": score,
                "labels": labels,
                "checks": {
                    "grounded": rand() < (0.3 if "factuality_error" in canonical else 0.85),
                    "cites_sources": cites,
                    "latency_ms": int(rng.lognormvariate(7.0, 0.45)),
                },
            },
        }
        if rand() < 0.01:
            tail.update(_EXTRA_FIELDS[int(rand() * len(_EXTRA_FIELDS))])
        return _Event(head, docs, tail)

    def corrupt(self, event: dict[str, Any], kind: str) -> str:
        """A malformed line of the given kind, still valid UTF-8 text on one line."""
        rng = self.rng
        if kind == "truncated_json":
            text = json.dumps(event, ensure_ascii=False)
            # Cutting anywhere before the final brace leaves the object unterminated.
            return text[: rng.randrange(len(text) // 4, len(text) - 1)]
        if kind == "json_array":
            return json.dumps([event], ensure_ascii=False)
        broken: dict[str, Any] = json.loads(json.dumps(event))
        match kind:
            case "missing_request_id":
                del broken["request_id"]
            case "blank_request_id":
                broken["request_id"] = "  "
            case "score_out_of_range":
                broken["evaluation"]["score"] = 1.7
            case "score_as_string":
                broken["evaluation"]["score"] = "0.4"
            case "docs_not_a_list":
                broken["docs"] = ", ".join(d["id"] for d in broken["docs"]) or "kb-1"
            case "doc_without_content":
                if not broken["docs"]:
                    broken["docs"].append({"id": "kb-1", "content": ""})
                del broken["docs"][rng.randrange(len(broken["docs"]))]["content"]
            case "invalid_timestamp":
                broken["timestamp"] = "yesterday"
            case _:
                raise ValueError(f"unknown bad kind: {kind}")
        return json.dumps(broken, ensure_ascii=False)


def _check_range(name: str, bounds: tuple[int, int], minimum: int) -> None:
    low, high = bounds
    if not minimum <= low <= high:
        raise ValueError(f"{name} must satisfy {minimum} <= min <= max, got {bounds!r}")


def generate_events(
    n: int,
    *,
    seed: int = 7,
    bad_share: float = 0.0,
    doc_chars: tuple[int, int] = (150, 900),
    docs_per_event: tuple[int, int] = (2, 8),
    start: datetime | None = None,
) -> list[str]:
    """n JSON lines (str, no trailing newline), deterministic for a given seed.

    ``round(n * bad_share)`` lines are malformed (kinds cycle through `BAD_KINDS`); the rest are
    valid events, ~2% of them exact re-sends of an earlier line. Timestamps start at ``start``
    (default 2026-11-01T00:00:00Z; naive datetimes are taken as UTC) and advance 0.5-5 s per line.
    Sizes are in the module docstring; benchmarks wanting ~7-8 KB per event pass more and longer
    docs, e.g. ``docs_per_event=BENCH_DOCS_PER_EVENT, doc_chars=BENCH_DOC_CHARS``.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not 0.0 <= bad_share <= 1.0:
        raise ValueError(f"bad_share must be within [0, 1], got {bad_share}")
    _check_range("doc_chars", doc_chars, 1)
    _check_range("docs_per_event", docs_per_event, 0)
    if start is None:
        start = DEFAULT_START
    elif start.tzinfo is None:
        start = start.replace(tzinfo=UTC)
    start = start.astimezone(UTC).replace(tzinfo=None)

    gen = _Generator(seed, doc_chars, docs_per_event)
    rng = gen.rng
    rand = rng.random
    bad_positions = set(rng.sample(range(n), round(n * bad_share)))
    lines: list[str] = []
    originals: list[str] = []
    elapsed_ms = 0
    bad_seen = 0
    for index in range(n):
        elapsed_ms += 500 + int(rand() * 4500)
        if index not in bad_positions and originals and rand() < 0.02:
            first = max(0, len(originals) - _RESEND_WINDOW)
            lines.append(originals[first + int(rand() * (len(originals) - first))])
            continue
        moment = start + timedelta(milliseconds=elapsed_ms)
        event = gen.event(index, moment.isoformat(timespec="milliseconds") + "Z")
        if index in bad_positions:
            lines.append(gen.corrupt(event.as_dict(), BAD_KINDS[bad_seen % len(BAD_KINDS)]))
            bad_seen += 1
        else:
            line = event.to_json()
            originals.append(line)
            lines.append(line)
    return lines


def write_jsonl(path: Path, lines: Iterable[str]) -> int:
    """Write lines as JSONL atomically; returns the number of lines written.

    The temporary sibling does not end in ``.jsonl``, so an inbox scanner never picks up a
    half-written file, and ``os.replace`` makes the whole file appear at once.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    count = 0
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as fh:
            # mkstemp creates the file 0600; consumers running as another user must read it.
            os.chmod(tmp_name, 0o644)
            for line in lines:
                if "\n" in line or "\r" in line:
                    # An embedded newline would silently split one record into two.
                    raise ValueError(f"line {count + 1} contains a line break")
                fh.write(line)
                fh.write("\n")
                count += 1
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    # The rename itself is only durable once the directory entry is on disk.
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return count


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m qe_assets.demo", description="Write deterministic demo quality events."
    )
    parser.add_argument("--count", type=int, default=1000, help="number of lines (default 1000)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--bad-share", type=float, default=0.0, help="share of malformed lines")
    parser.add_argument(
        "--doc-chars", type=int, nargs=2, default=(150, 900), metavar=("MIN", "MAX")
    )
    parser.add_argument(
        "--docs-per-event", type=int, nargs=2, default=(2, 8), metavar=("MIN", "MAX")
    )
    parser.add_argument("--out", type=Path, required=True, help="JSONL file to write")
    args = parser.parse_args(argv)
    try:
        lines = generate_events(
            args.count,
            seed=args.seed,
            bad_share=args.bad_share,
            doc_chars=tuple(args.doc_chars),
            docs_per_event=tuple(args.docs_per_event),
        )
    except ValueError as exc:
        parser.error(str(exc))
    written = write_jsonl(args.out, lines)
    print(f"wrote {written} lines to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
