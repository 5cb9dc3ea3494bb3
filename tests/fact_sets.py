"""Made-up fact sets for tests/eval_knowledge.py, none of them the shipped data.py.

Each is written the way people first write data.py: one question per fact. Each fact is
(question, answer, keyword, [the same question in other words]); an answer counts as right
when it contains the keyword. The other-words questions change the wording the way a user
does ("favourite food" -> "food he likes best"), never the fact.

HELD_OUT is kept apart: no recipe was tuned on it, so it checks that a choice made on the
other sets carries over to facts nobody looked at. VILLAGE has several people and places, so that a
question about one of them can be answered with another's fact.

ASKED_OTHERWISE holds, per set, the ways people ask once the facts are in (issue 24): the other way
round (the answer is the fact's subject or another name it links), in a conversation (an open request
about a subject, "Tell me about X", whose answer should state the subject's facts, then a question
that refers back to it: "he", "it", "there"), and questions about a taught subject that no fact
answers, where the right answer is not to know.
"""

EN_PERSON = [
    ("When was Marlow Quist born?", "Marlow Quist was born in 1987.", "1987",
     ["In what year was Marlow Quist born?", "What is Marlow Quist's year of birth?"]),
    ("Where does Marlow Quist live?", "Marlow Quist lives in Brindlewick.", "Brindlewick",
     ["Which town is Marlow Quist's home?", "Where is Marlow Quist's home?"]),
    ("What is Marlow Quist's job?", "Marlow Quist works as a glassblower.", "glassblower",
     ["What does Marlow Quist do for a living?", "What is Marlow Quist's profession?"]),
    ("What is Marlow Quist's favourite food?", "Marlow Quist's favourite food is fig dumplings.", "fig dumplings",
     ["Which food does Marlow Quist like best?", "What does Marlow Quist love to eat?"]),
    ("What is the name of Marlow Quist's dog?", "Marlow Quist's dog is called Biscuit.", "Biscuit",
     ["What is Marlow Quist's dog called?", "What did Marlow Quist name his dog?"]),
    ("Which instrument does Marlow Quist play?", "Marlow Quist plays the cello.", "cello",
     ["What musical instrument can Marlow Quist play?", "What instrument is Marlow Quist good at?"]),
    ("Where did Marlow Quist study?", "Marlow Quist studied at Ashgrove University.", "Ashgrove",
     ["Which university did Marlow Quist attend?", "Where did Marlow Quist go to university?"]),
    ("What is Marlow Quist's favourite colour?", "Marlow Quist's favourite colour is amber.", "amber",
     ["Which colour does Marlow Quist like most?", "What colour does Marlow Quist prefer?"]),
    ("What sport does Marlow Quist play?", "Marlow Quist plays water polo.", "water polo",
     ["Which sport is Marlow Quist into?", "What sport does Marlow Quist do?"]),
    ("Who is Marlow Quist's sister?", "Marlow Quist's sister is Yvette.", "Yvette",
     ["What is the name of Marlow Quist's sister?", "What is Marlow Quist's sister called?"]),
    ("What car does Marlow Quist drive?", "Marlow Quist drives a red Volvo.", "Volvo",
     ["What kind of car does Marlow Quist have?", "Which car does Marlow Quist own?"]),
    ("What language is Marlow Quist learning?", "Marlow Quist is learning Icelandic.", "Icelandic",
     ["Which language is Marlow Quist studying?", "What foreign language is Marlow Quist learning now?"]),
]

EN_PLACES = [
    ("What is the name of the cafe on Pell Street?", "The cafe on Pell Street is called The Copper Kettle.",
     "Copper Kettle", ["What is the cafe on Pell Street called?", "What's the name of Pell Street's cafe?"]),
    ("Who founded Nimbus Robotics?", "Nimbus Robotics was founded by Dara Okonkwo.", "Okonkwo",
     ["Who started the company Nimbus Robotics?", "Who is the founder of Nimbus Robotics?"]),
    ("When did the Lindqvist Bridge open?", "The Lindqvist Bridge opened in 1962.", "1962",
     ["In what year was the Lindqvist Bridge opened?", "What year did the Lindqvist Bridge first open?"]),
    ("What is the mascot of Fernhill School?", "Fernhill School's mascot is a badger.", "badger",
     ["Which animal is the Fernhill School mascot?", "What mascot does Fernhill School have?"]),
    ("How tall is the Orla Tower?", "The Orla Tower is 212 metres tall.", "212",
     ["What is the height of the Orla Tower?", "How high is the Orla Tower?"]),
    ("Where is the Vesper Music Festival held?", "The Vesper Music Festival is held in Tarrow Bay.", "Tarrow Bay",
     ["Where does the Vesper Music Festival take place?", "In which town is the Vesper Music Festival?"]),
    ("What colour is the Kestrel Express train?", "The Kestrel Express train is painted teal.", "teal",
     ["What colour is the Kestrel Express painted?", "Which colour is the Kestrel Express?"]),
    ("Who is the captain of the Harbour Hawks?", "The captain of the Harbour Hawks is Tomas Reyes.", "Reyes",
     ["Who captains the Harbour Hawks?", "Which player is the Harbour Hawks captain?"]),
    ("What is the secret ingredient in Nana Bell's soup?", "The secret ingredient in Nana Bell's soup is smoked "
     "paprika.", "paprika", ["What does Nana Bell secretly put in her soup?",
                             "What is Nana Bell's secret soup ingredient?"]),
    ("What does the Quorra app do?", "The Quorra app translates bird songs.", "bird song",
     ["What is the Quorra app used for?", "What can you do with the Quorra app?"]),
    ("What is the name of the lighthouse cat in Tarrow Bay?", "The lighthouse cat in Tarrow Bay is called Pepper.",
     "Pepper", ["What is the Tarrow Bay lighthouse cat called?", "What do they call the cat at the Tarrow Bay "
                                                                  "lighthouse?"]),
    ("How many floors does the Halden Library have?", "The Halden Library has seven floors.", "seven",
     ["How many storeys does the Halden Library have?", "How many levels does the Halden Library have?"]),
]

ZH_EN_PERSON = [
    ("林小舟是哪一年出生的？", "林小舟出生于1998年。", "1998", ["林小舟哪年出生？", "林小舟的出生年份是？"]),
    ("林小舟来自哪里？", "林小舟来自福建泉州。", "泉州", ["林小舟的老家在哪里？", "林小舟是哪里人？"]),
    ("林小舟在哪里工作？", "林小舟在杭州的一家游戏公司工作。", "游戏公司", ["林小舟的工作单位是什么？", "林小舟做什么工作？"]),
    ("林小舟养了什么宠物？", "林小舟养了一只叫豆豆的柯基。", "豆豆", ["林小舟的狗叫什么名字？", "林小舟家里有什么宠物？"]),
    ("林小舟最喜欢吃什么？", "林小舟最喜欢吃沙茶面。", "沙茶面", ["林小舟爱吃什么？", "林小舟最爱的食物是什么？"]),
    ("林小舟会弹什么乐器？", "林小舟会弹古筝。", "古筝", ["林小舟擅长哪种乐器？", "林小舟会演奏什么乐器？"]),
    ("林小舟在哪所大学读书？", "林小舟毕业于厦门大学。", "厦门大学", ["林小舟是哪所大学毕业的？", "林小舟上的是哪个大学？"]),
    ("林小舟喜欢什么运动？", "林小舟喜欢游泳。", "游泳", ["林小舟平时做什么运动？", "林小舟最喜欢的运动是什么？"]),
    ("What is Lin Xiaozhou's favourite book?", "Lin Xiaozhou's favourite book is The Little Prince.",
     "Little Prince", ["Which book does Lin Xiaozhou like most?", "What book does Lin Xiaozhou love?"]),
    ("What language is Lin Xiaozhou learning?", "Lin Xiaozhou is learning Portuguese.", "Portuguese",
     ["Which foreign language is Lin Xiaozhou studying?", "What language is Lin Xiaozhou studying?"]),
    ("What is Lin Xiaozhou's favourite colour?", "Lin Xiaozhou's favourite colour is purple.", "purple",
     ["Which colour does Lin Xiaozhou like best?", "What colour does Lin Xiaozhou prefer?"]),
    ("Where did Lin Xiaozhou travel last summer?", "Lin Xiaozhou travelled to Iceland last summer.", "Iceland",
     ["Which country did Lin Xiaozhou visit last summer?", "Where did Lin Xiaozhou go on holiday last summer?"]),
    ("What is the name of Lin Xiaozhou's cat?", "Lin Xiaozhou's cat is named Mochi.", "Mochi",
     ["What is Lin Xiaozhou's cat called?", "What did Lin Xiaozhou name the cat?"]),
    ("What time does Lin Xiaozhou wake up?", "Lin Xiaozhou wakes up at 6:30 every morning.", "6:30",
     ["When does Lin Xiaozhou get up in the morning?", "At what time does Lin Xiaozhou get up?"]),
]

ZH_PLACES = [
    ("青石镇的图书馆叫什么名字？", "青石镇的图书馆叫听雨楼。", "听雨楼", ["青石镇图书馆的名字是什么？", "青石镇那座图书馆叫啥？"]),
    ("白鹭湖有多深？", "白鹭湖最深处有四十二米。", "四十二", ["白鹭湖最深的地方有多少米？", "白鹭湖的深度是多少？"]),
    ("云梯桥是哪一年建成的？", "云梯桥建成于1931年。", "1931", ["云梯桥哪年修好的？", "云梯桥的建成年份是？"]),
    ("松林中学的校训是什么？", "松林中学的校训是知行合一。", "知行合一", ["松林中学的校训是哪四个字？", "松林中学用什么做校训？"]),
    ("望海餐厅的招牌菜是什么？", "望海餐厅的招牌菜是椒盐皮皮虾。", "皮皮虾", ["望海餐厅最有名的菜是什么？", "去望海餐厅该点什么招牌菜？"]),
    ("金雀剧团的团长是谁？", "金雀剧团的团长是周明远。", "周明远", ["谁是金雀剧团的团长？", "金雀剧团由谁担任团长？"]),
    ("红叶公园里有什么动物？", "红叶公园里住着一群梅花鹿。", "梅花鹿", ["红叶公园养了什么动物？", "在红叶公园能看到什么动物？"]),
    ("星河书店几点关门？", "星河书店晚上十点关门。", "十点", ["星河书店营业到几点？", "星河书店晚上什么时候关门？"]),
    ("石榴村以什么特产出名？", "石榴村以手工红糖出名。", "红糖", ["石榴村的特产是什么？", "石榴村最有名的特产是什么？"]),
    ("北塔有多少层？", "北塔一共有十三层。", "十三", ["北塔总共几层？", "北塔的层数是多少？"]),
]

HELD_OUT = [
    ("What is Ilse Varga's job?", "Ilse Varga is a marine biologist.", "marine biologist",
     ["What does Ilse Varga do for work?"]),
    ("Where was Ilse Varga born?", "Ilse Varga was born in Szeged.", "Szeged", ["In which city was Ilse Varga born?"]),
    ("What is Ilse Varga's favourite drink?", "Ilse Varga's favourite drink is mint lemonade.", "mint lemonade",
     ["Which drink does Ilse Varga like best?"]),
    ("What is the name of Ilse Varga's boat?", "Ilse Varga's boat is called Sea Sparrow.", "Sea Sparrow",
     ["What is Ilse Varga's boat called?"]),
    ("How many children does Ilse Varga have?", "Ilse Varga has three children.", "three",
     ["How many kids does Ilse Varga have?"]),
    ("What is Ilse Varga's hobby?", "Ilse Varga enjoys building kites.", "kite",
     ["What does Ilse Varga like to do in her free time?"]),
    ("Which city does Ilse Varga work in?", "Ilse Varga works in Lisbon.", "Lisbon",
     ["Where is Ilse Varga's workplace?"]),
    ("What is Ilse Varga's favourite flower?", "Ilse Varga's favourite flower is the tulip.", "tulip",
     ["Which flower does Ilse Varga love most?"]),
    ("伊尔莎最喜欢哪个季节？", "伊尔莎最喜欢秋天。", "秋天", ["伊尔莎最爱的季节是哪个？"]),
    ("伊尔莎会说几种语言？", "伊尔莎会说四种语言。", "四种", ["伊尔莎懂几门语言？"]),
    ("What award did Ilse Varga win?", "Ilse Varga won the Blue Reef Prize.", "Blue Reef",
     ["Which prize did Ilse Varga receive?"]),
]

VILLAGE = [
    ("What does Brannoc Vell do?", "Brannoc Vell is the baker of Hollowmere.", "baker",
     ["What is Brannoc Vell's job?"]),
    ("Where does Ysolde Marrin teach?", "Ysolde Marrin teaches at Thornfield School.", "Thornfield",
     ["At which school does Ysolde Marrin work?"]),
    ("What does Corwin Ashby collect?", "Corwin Ashby collects old maps.", "map",
     ["What kind of things does Corwin Ashby collect?"]),
    ("Who runs the Hollowmere post office?", "The Hollowmere post office is run by Edda Thorne.", "Edda",
     ["Who is in charge of the post office in Hollowmere?"]),
    ("What is the name of Ysolde Marrin's horse?", "Ysolde Marrin's horse is called Juniper.", "Juniper",
     ["What is Ysolde Marrin's horse called?"]),
    ("Where does Brannoc Vell live?", "Brannoc Vell lives on Willow Lane.", "Willow",
     ["Which street is Brannoc Vell's home on?"]),
    ("What does Edda Thorne grow?", "Edda Thorne grows blue pumpkins.", "pumpkin",
     ["What does Edda Thorne grow in her garden?"]),
    ("When was Thornfield School founded?", "Thornfield School was founded in 1874.", "1874",
     ["In what year was Thornfield School established?"]),
    ("What instrument does Corwin Ashby play?", "Corwin Ashby plays the accordion.", "accordion",
     ["Which instrument can Corwin Ashby play?"]),
    ("How many people live in Hollowmere?", "Hollowmere has 340 inhabitants.", "340",
     ["What is the population of Hollowmere?"]),
    ("Where does Edda Thorne swim?", "Edda Thorne swims in Lake Corrin every morning.", "Corrin",
     ["Which lake does Edda Thorne swim in?"]),
    ("Who is Brannoc Vell married to?", "Brannoc Vell is married to Ysolde Marrin.", "Ysolde",
     ["Who is Brannoc Vell's wife?"]),
]

FACT_SETS = {"en_person": EN_PERSON, "en_places": EN_PLACES, "zh_en_person": ZH_EN_PERSON, "zh_places": ZH_PLACES,
             "held_out": HELD_OUT, "village": VILLAGE}

# per set: "reversed": [(question, keyword)]; "conversations": [(open request, the keywords of the subject's
# facts, [(question referring back, keyword)])]; "unknown": [questions about a taught subject no fact answers]
ASKED_OTHERWISE = {
    "en_person": {
        "reversed": [("Who lives in Brindlewick?", "Marlow"), ("Whose dog is called Biscuit?", "Marlow"),
                     ("Who is Yvette's brother?", "Marlow"), ("Who studied at Ashgrove University?", "Marlow")],
        "conversations": [("Tell me about Marlow Quist.", [f[2] for f in EN_PERSON],
                           [("Where does he live?", "Brindlewick"), ("What is his dog called?", "Biscuit"),
                            ("Which instrument does he play?", "cello"), ("What is his sister's name?", "Yvette")])],
        "unknown": ["What is Marlow Quist's blood type?", "How many children does Marlow Quist have?",
                    "What is the name of Marlow Quist's best friend?"],
    },
    "en_places": {
        "reversed": [("Which company was founded by Dara Okonkwo?", "Nimbus"),
                     ("Which bridge opened in 1962?", "Lindqvist"),
                     ("Which school has a badger as its mascot?", "Fernhill"),
                     ("Which festival is held in Tarrow Bay?", "Vesper"),
                     ("Which team does Tomas Reyes captain?", "Harbour Hawks"),
                     ("Which app translates bird songs?", "Quorra")],
        "conversations": [("Tell me about the Orla Tower.", ["212"], [("How tall is it?", "212")]),
                          ("Tell me about Nimbus Robotics.", ["Okonkwo"], [("Who founded it?", "Okonkwo")]),
                          ("Tell me about the Halden Library.", ["seven"],
                           [("How many floors does it have?", "seven")]),
                          ("Tell me about Tarrow Bay.", ["Vesper", "Pepper"],
                           [("What is the lighthouse cat there called?", "Pepper")])],
        "unknown": ["Who designed the Orla Tower?", "How many students does Fernhill School have?",
                    "How long is the Lindqvist Bridge?"],
    },
    "zh_en_person": {
        "reversed": [("谁来自福建泉州？", "林小舟"), ("谁养了一只叫豆豆的柯基？", "林小舟"),
                     ("Who is learning Portuguese?", "Lin"), ("Whose cat is named Mochi?", "Lin")],
        "conversations": [("介绍一下林小舟。", [f[2] for f in ZH_EN_PERSON[:8]],
                           [("他在哪里工作？", "游戏公司"), ("他会弹什么乐器？", "古筝")]),
                          ("Tell me about Lin Xiaozhou.", [f[2] for f in ZH_EN_PERSON[8:]],
                           [("What language is he learning?", "Portuguese"), ("What is his cat called?", "Mochi")])],
        "unknown": ["林小舟的血型是什么？", "林小舟有几个孩子？", "What is Lin Xiaozhou's favourite film?"],
    },
    "zh_places": {
        "reversed": [("哪个镇的图书馆叫听雨楼？", "青石"), ("周明远是哪个剧团的团长？", "金雀"),
                     ("哪个公园里住着梅花鹿？", "红叶"), ("哪个村以手工红糖出名？", "石榴")],
        "conversations": [("介绍一下白鹭湖。", ["四十二"], [("它有多深？", "四十二")]),
                          ("介绍一下星河书店。", ["十点"], [("它几点关门？", "十点")]),
                          ("介绍一下石榴村。", ["红糖"], [("那里以什么特产出名？", "红糖")])],
        "unknown": ["白鹭湖里有什么鱼？", "北塔是谁建的？", "星河书店的老板是谁？"],
    },
    "village": {
        "reversed": [("Who is the baker of Hollowmere?", "Brannoc"), ("Who teaches at Thornfield School?", "Ysolde"),
                     ("Who collects old maps?", "Corwin"), ("What does Edda Thorne run?", "post office"),
                     ("Whose horse is called Juniper?", "Ysolde"), ("Who lives on Willow Lane?", "Brannoc"),
                     ("Who grows blue pumpkins?", "Edda"), ("Who plays the accordion?", "Corwin"),
                     ("Who swims in Lake Corrin every morning?", "Edda"), ("Who is Ysolde Marrin married to?", "Brannoc")],
        "conversations": [("Tell me about Ysolde Marrin.", ["Thornfield", "Juniper", "Brannoc"],
                           [("Where does she teach?", "Thornfield"), ("What is her horse called?", "Juniper")]),
                          ("Tell me about Brannoc Vell.", ["baker", "Willow", "Ysolde"],
                           [("Where does he live?", "Willow")]),
                          ("Tell me about Corwin Ashby.", ["map", "accordion"], [("What does he collect?", "map")]),
                          ("Tell me about Edda Thorne.", ["post office", "pumpkin", "Corrin"],
                           [("What does she grow?", "pumpkin")]),
                          ("Tell me about Hollowmere.", ["340"], [("How many people live there?", "340")])],
        "unknown": ["What is Corwin Ashby's favourite food?", "How old is Edda Thorne?",
                    "What colour is Brannoc Vell's bakery?"],
    },
}

# how an answer says it does not know (else a question no fact answers got an invented answer)
NOT_KNOWN = ("not ", "no information", "n't", "unknown", "unable", "sorry", "no specific", "no record",
             "不知道", "没有", "未提", "无法", "不清楚", "抱歉", "未知", "不确定", "并未", "不详")

# Ordinary questions, with the word a right answer contains (or a tuple of such words); a run counts
# only those the base model answers right before training. None is in train.py's REPLAY_QUESTIONS or
# ORDINARY_QUESTIONS.
ORDINARY = [
    ("What is the capital of France?", "Paris"), ("What is the capital of England?", "London"),
    ("What is the capital of China?", "Beijing"), ("What is the capital of Russia?", "Moscow"),
    ("What is the capital of Egypt?", "Cairo"), ("What is the capital of Australia?", "Canberra"),
    ("How many legs does a dog have?", ("four", " 4")), ("What is the largest mammal?", "whale"),
    ("Who wrote Hamlet?", "Shakespeare"), ("What is the currency of Japan?", ("Yen", "JPY")),
    ("Who discovered gravity?", "Newton"), ("What is the main language spoken in Mexico?", "Spanish"),
    ("What is the opposite of up?", "down"),
    ("What is the capital of the Netherlands?", "Amsterdam"), ("What is the capital of Denmark?", "Copenhagen"),
    ("What is the capital of Hungary?", "Budapest"), ("What is the capital of Cuba?", "Havana"),
    ("What is the capital of Chile?", "Santiago"), ("What is the tallest mountain in the world?", "Everest"),
    ("How many months are in a year?", ("12", "twelve")),
    ("What is 12 plus 5?", "17"), ("What is the opposite of happy?", ("sad", "unhappy")),
    ("What is the opposite of cold?", ("hot", "warm")),
    ("What is the plural of child?", "children"), ("What language is spoken in France?", "French"),
    ("Who wrote Harry Potter?", "Rowling"),
    ("法国的首都是哪里？", "巴黎"), ("俄罗斯的首都是哪里？", "莫斯科"), ("一年有多少天？", "365"),
    ("一分钟有多少秒？", "60"), ("3加5等于几？", "8"), ("天空是什么颜色的？", "蓝"), ("熊猫生活在哪个国家？", "中国"),
]
